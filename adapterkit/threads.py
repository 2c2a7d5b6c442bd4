"""CPU thread settings that survive a busy machine, applied by the CLI and the benchmarks before torch is imported.

torch's CPU kernels run on OpenMP (GNU libgomp in the PyPI wheels), whose worker threads by default spin for a while
at every barrier instead of sleeping. With another CPU-bound process on the same cores, a spinning thread holds a
core that a descheduled worker needs, and every parallel region waits for that worker: on 2 cores with one other
job, `adapterkit demo` went from ~2 minutes to 21 and a 7 ms swap to 756 ms. `OMP_WAIT_POLICY=PASSIVE` makes idle
threads sleep, so a run shares the machine the way any other program does.

Override: set `OMP_WAIT_POLICY` yourself (ACTIVE restores spinning, the fastest setting on cores nobody else uses);
`OMP_NUM_THREADS` sets the thread count as usual. Both are read once, when torch loads libgomp: set them before
`import torch` (a Python program that imports torch first gets OpenMP's defaults).
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"


def configure_threads() -> dict:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user set it. Returns what applies: {"OMP_WAIT_POLICY", "OMP_NUM_THREADS",
    "effective"}, where effective is False when torch was imported before this call (libgomp has read its settings)."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)
    return {
        "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "effective": "torch" not in sys.modules,
    }
