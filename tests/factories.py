"""Tiny objects the tests share: random adapters on a tiny base, small images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from adapterkit.adapters import Adapter, custom_diffusion, lora
from adapterkit.base import cross_attention_kv_layers


def random_image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.rand(size, size, 3) * 55
    return Image.fromarray(base.astype(np.uint8))


def random_custom_diffusion(base, task: str, seed: int = 0, strength: float = 0.5, instructions=None) -> Adapter:
    """K/V = base K/V + noise: a synthetic Custom Diffusion adapter that visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in cross_attention_kv_layers(base.unet).items():
        w = layer.weight.detach().float().cpu()
        tensors[name] = w + strength * w.std() * torch.randn(w.shape, generator=gen)
    return Adapter(
        method=custom_diffusion.METHOD,
        task=task,
        instructions=instructions or [f"{task} the image"],
        tensors=tensors,
        base={"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
    )


def random_lora(base, task: str, rank: int = 4, alpha: float | None = None, seed: int = 0, targets="kv", instructions=None) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    config = lora.make_config(rank, alpha, targets)
    named = dict(base.unet.named_modules())
    tensors = {}
    for name, module in named.items():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in config["target_modules"]):
            d_out, d_in = module.weight.shape
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.3
    return Adapter(
        method=lora.METHOD,
        task=task,
        instructions=instructions or [f"{task} the image"],
        tensors=tensors,
        base={"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
        lora=config,
    )


def to_array(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0
