"""Reading weight files without trusting them: safetensors, or `.bin` through torch's weights-only unpickler.

Every failure is an AdapterkitError naming the file and the fix; a tensor that is not floating point or holds
NaN/Inf is refused, since applying it would silently ruin every edit.
"""

from __future__ import annotations

import os
import pickle

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import AdapterkitError


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise AdapterkitError(f"weight file {path} is missing; point to a folder written by adapterkit or diffusers")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterkitError(f"{path} is not a readable safetensors file ({_short(e)}); re-save or re-download it") from e
    return check_tensors(tensors, path)


def load_torch_bin(path: str, skip_empty: bool = False) -> dict[str, torch.Tensor]:
    """Load a legacy `.bin` state dict with `weights_only=True`: a pickle that tries to run code is refused.

    `skip_empty`: drop entries whose value is an empty dict. diffusers' `save_attn_procs(safe_serialization=False)`
    writes `{}` for every processor without weights (each attn1 of a Custom Diffusion UNet) beside the tensors.
    """
    if not os.path.isfile(path):
        raise AdapterkitError(f"weight file {path} is missing; point to a folder written by adapterkit or diffusers")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as e:
        raise AdapterkitError(
            f"{path} is not a plain tensor checkpoint and was not loaded ({_short(e)}); convert it to safetensors"
        ) from e
    if skip_empty and isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if not (isinstance(v, dict) and not v)}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterkitError(f"{path} does not hold a state dict of named tensors; convert it to safetensors")
    return check_tensors(obj, path)


def check_tensors(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    if not tensors:
        raise AdapterkitError(f"{path} holds no tensors")
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterkitError(f"{path}: tensor '{key}' has dtype {value.dtype}; adapter weights must be floating point")
        if not torch.isfinite(value).all():
            raise AdapterkitError(f"{path}: tensor '{key}' holds NaN or Inf values; the adapter is corrupt (retrain or restore it)")
    return tensors


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
