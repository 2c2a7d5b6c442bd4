"""LoRA files in diffusers' format: `pytorch_lora_weights.safetensors` with keys `unet.<module>.lora.down.weight`
(A) / `lora.up.weight` (B) and the LoraConfig in the safetensors metadata, so `pipe.load_lora_weights(folder)` in
plain diffusers gives the same model. Split from lora.py (the method protocol) to keep each file one job.
"""

from __future__ import annotations

import os

import torch

from ..errors import AdapterkitError, first_line
from .safe_load import check_tensors

FILE_NAME = "pytorch_lora_weights.safetensors"
LEGACY_FILE_NAME = "pytorch_lora_weights.bin"


def modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths of peft-keyed tensors (`<module>.lora_A.weight` -> `<module>`), sorted."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in tensors})


def to_diffusers_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys -> diffusers file keys: `unet.<module>.lora.down.weight` (A) / `lora.up.weight` (B)."""
    out = {}
    for key, value in tensors.items():
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        out["unet." + key] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def write(folder: str, tensors: dict[str, torch.Tensor], config: dict) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    # Explicit module names in the metadata: diffusers rebuilds the exact LoraConfig from it on load.
    metadata = {**config, "target_modules": modules(tensors)}
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        folder,
        unet_lora_layers={k.removeprefix("unet."): v for k, v in to_diffusers_state_dict(tensors).items()},
        unet_lora_adapter_metadata=metadata,
        weight_name=FILE_NAME,
    )


def read(folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a LoRA folder written by adapterkit, diffusers' training scripts, or another diffusers-loadable format.

    diffusers' own loader converts the file (kohya and other layouts too); the config comes from the file's
    metadata when present, else from the ranks in the file with alpha = r (diffusers' convention).
    """
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs

    from .safe_load import load_safetensors, load_torch_bin

    path = os.path.join(folder, FILE_NAME)
    if os.path.isfile(path):
        raw = load_safetensors(path)  # validates the file before diffusers parses it
    else:
        path = os.path.join(folder, LEGACY_FILE_NAME)
        raw = load_torch_bin(path)
    try:
        sd, network_alphas, metadata = StableDiffusionInstructPix2PixPipeline.lora_state_dict(
            raw if path.endswith(".bin") else folder, weight_name=None if path.endswith(".bin") else FILE_NAME,
            return_lora_metadata=True,
        )
    except (ValueError, KeyError, RuntimeError) as e:
        raise AdapterkitError(f"{path} is not a LoRA file diffusers can read ({first_line(e)[:160]})") from e
    other = sorted(k for k in sd if not k.startswith("unet."))
    if other:
        raise AdapterkitError(
            f"{path} also holds non-UNet LoRA weights (e.g. '{other[0]}'); adapterkit adapters change the UNet only"
        )
    unet_sd = {k.removeprefix("unet."): v for k, v in sd.items()}
    tensors = {k: v.float() for k, v in convert_unet_state_dict_to_peft(unet_sd).items()}
    bad = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if bad:
        raise AdapterkitError(f"{path}: unsupported LoRA key '{bad[0]}' (only plain LoRA A/B weights are supported)")
    check_tensors(tensors, path)
    if metadata:
        config = {k.removeprefix("unet."): v for k, v in metadata.items() if k.startswith("unet.")}
    else:
        alphas = {k.removeprefix("unet."): v for k, v in (network_alphas or {}).items()}
        rank_dict = {k: v.shape[1] for k, v in tensors.items() if k.endswith("lora_B.weight")}
        kwargs = get_peft_kwargs(rank_dict, alphas, tensors, is_unet=True)
        config = {k: kwargs[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")}
    config = {k: config[k] for k in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern") if k in config}
    if "r" not in config or "lora_alpha" not in config:
        raise AdapterkitError(f"{path}: LoRA metadata lacks r or lora_alpha; re-save the adapter")
    config["target_modules"] = sorted(config.get("target_modules") or modules(tensors))
    return tensors, config


def load_into_pipeline(pipe, tensors: dict[str, torch.Tensor], config: dict, adapter_name: str, hotswap: bool = False) -> None:
    """Install (or hot-swap) this LoRA into `pipe.unet` through diffusers, exactly as load_lora_weights would."""
    metadata = {"unet." + k: v for k, v in {**config, "target_modules": modules(tensors)}.items()}
    pipe.load_lora_into_unet(
        to_diffusers_state_dict(tensors),
        network_alphas=None,
        unet=pipe.unet,
        adapter_name=adapter_name,
        metadata=metadata,
        _pipeline=pipe,
        hotswap=hotswap,
    )
