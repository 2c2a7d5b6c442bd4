"""Lazy re-exports for package `__init__` files: `import adapterkit` and `adapterkit --help` must not import torch."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_getattr(package: str, table: dict[str, str], namespace: dict) -> Callable[[str], object]:
    """A module-level `__getattr__` that imports `table[name]` (a module path relative to `package`) on first use
    and stores the value in `namespace` (the package's globals), so later lookups are plain attribute reads."""

    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
