"""How adapters are COMBINED: `merge(adapters, base, method, ...)` (run.py) with the methods and their options in
methods.py (torch-free: the CLI takes its choices from it), least squares in lsq.py, baselines in baselines.py,
the report in report.py, its warnings and probes in diagnostics.py, stored constraints (incremental merges) in
incremental.py, the fused pipeline (--fuse) in fuse.py.

`merge`, `MergeResult` and `fuse_into_pipeline` are imported on first use (module `__getattr__`), so reading the
registry does not load torch.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

from .methods import METHODS, OTHER_MODULE_METHODS, MergeOptions  # noqa: F401  (torch-free)

_LAZY = {"merge": ".run", "MergeResult": ".run", "fuse_into_pipeline": ".fuse"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = ["METHODS", "MergeOptions", "OTHER_MODULE_METHODS", *_LAZY]
