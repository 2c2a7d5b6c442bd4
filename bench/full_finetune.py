"""The full fine-tuning baseline as an adapter method, so that it trains through the real `train()` (same data
stream, loss, accelerate mixed precision, gradient checkpointing, optimizer, logging and final save) and differs
from Custom Diffusion and LoRA only in which parameters train: all of the UNet's.

Benchmarks only: `register()` adds it to the registry at run time (adapters.register_method), nothing in the
library knows it. Its "adapter" is the whole UNet state dict (SD1.5: 859.5M parameters, 3.4 GB fp32), written as
safetensors; the bank verbs (swap, merge, fuse) are not part of what the benchmark measures and say so.
"""

from __future__ import annotations

import os

import torch

METHOD = "full-finetune"
FILE_NAME = "unet_full.safetensors"
LEGACY_FILE_NAME = "unet_full.bin"
METADATA_KEYS = ()


def training_options(settings: dict):
    return None


def check_options(options, task) -> None:
    return None


def make_trainable(unet, options=None) -> list[torch.nn.Parameter]:
    """Every UNet parameter trains (the baseline Custom Diffusion and LoRA are compared with)."""
    unet.requires_grad_(True)
    return list(unet.parameters())


def is_adapter_parameter(name: str) -> bool:
    return True


def extract(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in unet.named_parameters()}


def load_trainable(unet, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.copy_(tensors[name])


def live_kv_delta(unet, options, base_kv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """--kv-preservation: the attn2 K/V weights' change from the base, differentiable (as Custom Diffusion's)."""
    from adapterkit.base import cross_attention_kv_layers

    return {name: layer.weight.float() - base_kv[name] for name, layer in cross_attention_kv_layers(unet).items()}


def targets(tensors) -> list[str]:
    return sorted(tensors)


def rank(tensors, options=None) -> None:
    return None


def delta_weights(tensors, base_weights, options=None, dtype=torch.float32):
    return {name: tensors[name].to(dtype) - w.to(dtype) for name, w in base_weights.items() if name in tensors}


def check_shapes(tensors, unet) -> None:
    shapes = {name: p.shape for name, p in unet.named_parameters()}
    bad = [name for name, t in tensors.items() if shapes.get(name) != t.shape]
    if bad:
        raise ValueError(f"UNet parameter {bad[0]} is missing or has another shape")


def fuse_into_base(unet, tensors, options=None) -> None:
    load_trainable(unet, tensors)


def read(folder: str):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, FILE_NAME)), None


def write(folder: str, tensors, options=None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, FILE_NAME))


def metadata(tensors, options=None) -> dict:
    return {}


def card(tensors, options=None) -> tuple[str, str]:
    return (f"a fully fine-tuned UNet ({sum(t.numel() for t in tensors.values()) / 1e6:.1f}M parameters), "
            "written by bench/gpu.py", "# a benchmark artefact: load the state dict into the base UNet\n")


class Swap:
    """Hot-swapping a whole UNet is what adapters avoid; the benchmark never asks for it."""

    def __init__(self, pipe):
        raise NotImplementedError("full-finetune is a training baseline of bench/gpu.py; it is not swapped in a bank")


def register():
    import sys

    from adapterkit.adapters import register_method

    register_method(sys.modules[__name__])
    return METHOD


def unregister() -> None:
    from adapterkit.adapters import unregister_method

    unregister_method(METHOD)
