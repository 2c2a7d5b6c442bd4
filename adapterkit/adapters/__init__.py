"""What an adapter IS: the Adapter record (record.py), one module per method with the same verbs
(custom_diffusion.py, lora.py; the registry and the list of verbs in registry.py), and AdapterBank (bank.py).

Importing this package loads no torch: the registry names methods without importing them, and the record and
the bank are imported on first use (module `__getattr__`), so `adapterkit --help` stays fast.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

from .registry import get_method, method_names, register_method, unregister_method

_LAZY = {
    "Adapter": ".record",
    "MergeRecord": ".record",
    "load_adapter": ".record",
    "save_adapter": ".record",
    "infer_method": ".record",
    "model_card": ".record",
    "FORMAT_VERSION": ".record",
    "METADATA_FILE": ".record",
    "AdapterBank": ".bank",
}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = ["get_method", "method_names", "register_method", "unregister_method", *_LAZY]
