"""adapterkit: train, merge, evaluate and hot-swap lightweight task adapters for InstructPix2Pix.

The public API is re-exported here lazily (module `__getattr__`): `import adapterkit` and `adapterkit --help`
load no torch; each name imports its module on first use.
"""

from __future__ import annotations

import sys
import types

from .compat import quiet_third_party_logs
from .lazy import lazy_getattr

quiet_third_party_logs()


def __dir__():  # the lazy names too, for tab completion
    return sorted(set(globals()) | set(_LAZY))


def _installed_version() -> str:
    """The installed distribution's version (pyproject.toml), as `adapterkit --version` prints it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapterkit")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()

# public name -> module that defines it
_LAZY = {
    "Adapter": ".adapters.record",
    "load_adapter": ".adapters.record",
    "save_adapter": ".adapters.record",
    "AdapterBank": ".adapters.bank",
    "Base": ".base",
    "compute_fingerprint": ".base",
    "convert_sd15_to_ip2p": ".base",
    "load_base": ".base",
    "AdapterkitError": ".errors",
    "adopt": ".adopt",
    "evaluate": ".eval.run",
    "merge": ".merge.run",
    "train": ".train.loop",
    "TrainConfig": ".train.config",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


class _Package(types.ModuleType):
    """`adapterkit.merge` and `adapterkit.train` name both a function of the API and a subpackage. Importing the
    subpackage would set the attribute to the module; keep the function (as the eager `from .merge import merge`
    used to), so `adapterkit.merge(...)` works whatever was imported first."""

    def __setattr__(self, name, value):
        if name in ("merge", "train") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = sorted(_LAZY)
