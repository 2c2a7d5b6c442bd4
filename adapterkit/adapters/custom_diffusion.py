"""Custom Diffusion (Kumari et al., 2212.04488): a task is new full weights for every cross-attention K and V.

Only `attn2.to_k` and `attn2.to_v` change: the projections that read text features. With the image entering
IP2P through conv_in, these still see only the instruction, which is what makes least-squares merging apply.

Tensors of an adapter: `{"<block path>.attn2.to_k": W (d_out, d_text), "<block path>.attn2.to_v": W, ...}`, full
weights, not deltas. On disk: diffusers' own file name and keys,
`<block path>.attn2.processor.to_k_custom_diffusion.weight` (see `read` / `write`).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..base import cross_attention_kv_layers
from ..errors import AdapterkitError
from .safe_load import load_safetensors, load_torch_bin

METHOD = "custom-diffusion"
FILE_NAME = "pytorch_custom_diffusion_weights.safetensors"
LEGACY_FILE_NAME = "pytorch_custom_diffusion_weights.bin"
_FILE_SUFFIX = {"to_k": ".processor.to_k_custom_diffusion.weight", "to_v": ".processor.to_v_custom_diffusion.weight"}


def make_trainable(unet) -> list[torch.nn.Parameter]:
    """Freeze the UNet, then unfreeze every attn2 K/V weight; return those parameters (SD1.5: 32 tensors, 19.2M)."""
    unet.requires_grad_(False)
    params = []
    for layer in cross_attention_kv_layers(unet).values():
        layer.weight.requires_grad_(True)
        params.append(layer.weight)
    return params


def extract(unet) -> dict[str, torch.Tensor]:
    """The current attn2 K/V weights as adapter tensors (fp32, CPU, detached copies)."""
    return {name: layer.weight.detach().to("cpu", torch.float32).clone() for name, layer in cross_attention_kv_layers(unet).items()}


def check_shapes(tensors: dict[str, torch.Tensor], unet) -> None:
    """Raise on the first tensor whose layer is missing from this UNet or has another shape, or on a missing layer.

    A Custom Diffusion file always covers every attn2 K/V of its UNet; fewer layers means a damaged file.
    """
    layers = cross_attention_kv_layers(unet)
    missing = sorted(set(layers) - set(tensors))
    if missing:
        raise AdapterkitError(
            f"adapter lacks {len(missing)} of the base's {len(layers)} K/V layers (first: {missing[0]}); "
            "the file is incomplete or made for another UNet"
        )
    for name in sorted(tensors):
        if name not in layers:
            raise AdapterkitError(f"adapter layer {name} does not exist in this base; the adapter was made for another UNet")
        expected = tuple(layers[name].weight.shape)
        if tuple(tensors[name].shape) != expected:
            raise AdapterkitError(
                f"adapter layer {name} has shape {tuple(tensors[name].shape)} but the base expects {expected}; "
                "the adapter was made for another base"
            )


def delta_weights(tensors: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """dW = W_task - W0 per layer, in float32 (config is unused: present so both methods share one signature)."""
    return {name: tensors[name].float() - base_weights[name].float() for name in tensors}


def swap_in(unet, tensors: dict[str, torch.Tensor], layers: dict[str, torch.nn.Linear] | None = None) -> None:
    """Copy the task's K/V into the live weights in place: same Parameter objects, so compiled graphs stay valid.

    `layers` (from cross_attention_kv_layers) may be passed to skip walking the UNet on every swap.
    """
    layers = layers if layers is not None else cross_attention_kv_layers(unet)
    with torch.no_grad():
        for name, weight in tensors.items():
            layers[name].weight.copy_(weight)


def fuse_into_base(unet, tensors: dict[str, torch.Tensor], config=None) -> None:
    """Bake the adapter into the base for good (a Custom Diffusion adapter is full weights: fusing is swapping)."""
    swap_in(unet, tensors)


def write(folder: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write diffusers' Custom Diffusion file (full K/V weights under processor keys)."""
    file_sd = {}
    for name, weight in tensors.items():
        attn, proj = name.rsplit(".", 1)
        file_sd[attn + _FILE_SUFFIX[proj]] = weight.detach().to("cpu", torch.float32).contiguous()
    save_file(file_sd, os.path.join(folder, FILE_NAME), metadata={"format": "pt"})


def read(folder: str) -> dict[str, torch.Tensor]:
    """Read a Custom Diffusion folder (safetensors, or diffusers' legacy .bin without unpickling code)."""
    path = os.path.join(folder, FILE_NAME)
    if os.path.isfile(path):
        file_sd = load_safetensors(path)
    else:
        file_sd = load_torch_bin(os.path.join(folder, LEGACY_FILE_NAME))
    tensors = {}
    for key, value in file_sd.items():
        for proj, suffix in _FILE_SUFFIX.items():
            if key.endswith(suffix):
                tensors[key[: -len(suffix)] + "." + proj] = value.float()
                break
        else:
            # to_q/to_out weights (diffusers' --train_q_out) or modifier-token embeddings are not Custom Diffusion K/V.
            raise AdapterkitError(
                f"unsupported key '{key}' in {os.path.basename(path)}: adapterkit reads attn2 to_k/to_v weights only "
                "(retrain without --train_q_out)"
            )
    if not tensors:
        raise AdapterkitError(f"{path} holds no Custom Diffusion weights")
    return tensors
