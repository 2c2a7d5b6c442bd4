"""How adapters are COMBINED: `merge(adapters, base, method, ...)` (run.py) with the methods and their options in
methods.py (torch-free: the CLI takes its choices from it), least squares in lsq.py, baselines in baselines.py.

`merge`, `MergeResult` and `fuse_into_pipeline` are imported on first use (module `__getattr__`), so reading the
registry does not load torch.
"""

from __future__ import annotations

from .methods import METHODS, OTHER_MODULE_METHODS, MergeOptions  # noqa: F401  (torch-free)

_LAZY = {"merge": ".run", "MergeResult": ".run", "fuse_into_pipeline": ".run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "MergeOptions", "OTHER_MODULE_METHODS", *_LAZY]
