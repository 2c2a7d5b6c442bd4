"""The adapter-method registry: method name -> the module that implements it. Imports no torch.

A method is one module with the verbs listed in PROTOCOL (see adapters/custom_diffusion.py for the reference
implementation, every verb documented). Built-in methods are named here by module path and imported on first
use, so `adapterkit --help` and TrainConfig can list the names without loading torch. A new built-in method is a
new file plus one line in BUILTIN; a method living elsewhere (a plugin, a test) calls `register_method(module)`.
"""

from __future__ import annotations

import importlib

from ..errors import AdapterkitError

# name -> module path (imported lazily). One line per built-in method.
BUILTIN = {
    "custom-diffusion": "adapterkit.adapters.custom_diffusion",
    "lora": "adapterkit.adapters.lora",
}

# Every method module defines these. Constants first, then the verbs the library calls; their signatures are
# the same in every method (documented in custom_diffusion.py).
PROTOCOL = (
    "METHOD",  # its name in adapter.json and on the command line
    "FILE_NAME",  # weight file in an adapter folder (how a folder without adapter.json is recognised)
    "LEGACY_FILE_NAME",  # older name of that file, read but never written
    "METADATA_KEYS",  # adapter.json keys `metadata` writes
    "training_options",  # (settings: dict) -> options: the method's options from a resolved TrainConfig dict
    "check_options",  # (options, task) -> None: raise on missing or bad options
    "make_trainable",  # (unet, options) -> [Parameter]: freeze the UNet, attach/unfreeze the adapter
    "is_adapter_parameter",  # (parameter name) -> bool: a bug guard in training
    "extract",  # (unet) -> tensors: the trained adapter's tensors, fp32 CPU copies
    "load_trainable",  # (unet, tensors) -> None: put saved tensors back into the trainable parameters (resume)
    "live_kv_delta",  # (unet, options, base_kv) -> {attn2 K/V path: dW}: the change being trained, with gradients
    "targets",  # (tensors) -> [module path]: modules the adapter changes
    "rank",  # (tensors, options) -> int | None
    "delta_weights",  # (tensors, base_weights, options, dtype) -> {module path: dW}
    "check_shapes",  # (tensors, unet) -> None: raise on a layer this UNet lacks or of another shape
    "fuse_into_base",  # (unet, tensors, options) -> None: bake the adapter into the weights for good
    "read",  # (folder) -> (tensors, options)
    "write",  # (folder, tensors, options) -> None: diffusers-loadable weight file
    "metadata",  # (tensors, options) -> dict: extra adapter.json entries
    "card",  # (tensors, options) -> (what it is, how to load it in plain diffusers): model card text
    "Swap",  # class (pipe) with add / prepare / activate / deactivate / close: how AdapterBank swaps it
)

_registered: dict[str, object] = {}  # name -> module, for methods registered at run time


def method_names() -> list[str]:
    """Every method name, built-in first; imports nothing."""
    return list(BUILTIN) + [name for name in _registered if name not in BUILTIN]


def get_method(name: str):
    """The module of method `name`; AdapterkitError naming the known methods otherwise."""
    if name in _registered:
        return _registered[name]
    if name in BUILTIN:
        return importlib.import_module(BUILTIN[name])
    raise AdapterkitError(f"unknown adapter method '{name}'; use one of {', '.join(method_names())}")


def register_method(module) -> None:
    """Add a method module (it must define every name in PROTOCOL). Registering a name again replaces it."""
    missing = [verb for verb in PROTOCOL if not hasattr(module, verb)]
    if missing:
        raise TypeError(f"method module {module.__name__} lacks {', '.join(missing)} (see adapters/registry.py PROTOCOL)")
    _registered[module.METHOD] = module


def unregister_method(name: str) -> None:
    """Remove a method registered with `register_method` (tests clean up with it)."""
    _registered.pop(name, None)
