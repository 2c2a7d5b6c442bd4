"""Test-only fault injection: kill this process with SIGKILL at a named moment, to prove crash safety (issue 7).

`ADAPTERKIT_FAULT_INJECT=<point>` (or `<point>:<n>`, the n-th time the point is reached; default the first)
makes `fault_point(<point>)` send SIGKILL to its own process: nothing after it runs, no `finally`, no atexit,
exactly what `kill -9` or the kernel's OOM killer does. tests/test_reliability_crash.py sets it on a subprocess.

Points (each a line in the code that says `fault_point(...)`):
- `train.step`: inside an optimizer step, after backward, before the weights change (train/loop.py).
- `checkpoint.write`: inside a checkpoint's temporary folder, half written (train/loop.py).
- `checkpoint.saved`: the new checkpoint renamed into place, older ones not yet pruned (train/loop.py).
- `publish.write`: inside the final adapter's temporary folder, half written (train/loop.py).
- `atomic_folder.<name>`: a temporary folder for `.../<name>` complete and flushed, not yet renamed (fileio.py).
- `discard.<name>`: a folder renamed aside for deletion, not yet deleted (fileio.py).

The variable is read once at import: with it unset (always, outside these tests) a point is one comparison.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "ADAPTERKIT_FAULT_INJECT"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    if name and count.isdigit():
        return name, int(count)
    return spec, 1


_TARGET = _parse(os.environ.get(VARIABLE))
_hits = 0


def fault_point(name: str) -> None:
    """SIGKILL this process here when ADAPTERKIT_FAULT_INJECT names this point (and this is its n-th hit)."""
    global _hits
    if _TARGET is None or name != _TARGET[0]:
        return
    _hits += 1
    if _hits == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
