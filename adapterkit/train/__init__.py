"""How an adapter is MADE: `train(TrainConfig)` on an edit dataset (config.py; the recipe in loop.py).

`train` and `TrainConfig` are imported on first use (module `__getattr__`): the CLI reads train/config.py to build
its options, and that must not load torch.
"""

from __future__ import annotations

_LAZY = {"TrainConfig": ".config", "train": ".loop"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "train"]
