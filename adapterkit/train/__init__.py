"""How an adapter is MADE: `train(TrainConfig)` on an edit dataset (config.py; the recipe in loop.py).

`train` and `TrainConfig` are imported on first use (module `__getattr__`): the CLI reads train/config.py to build
its options, and that must not load torch.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {"TrainConfig": ".config", "train": ".loop"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = ["TrainConfig", "train"]
