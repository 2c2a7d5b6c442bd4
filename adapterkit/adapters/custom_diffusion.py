"""Custom Diffusion (Kumari et al., 2212.04488): a task is new full weights for every cross-attention K and V.

Only `attn2.to_k` and `attn2.to_v` change: the projections that read text features. With the image entering
IP2P through conv_in, these still see only the instruction, which is what makes least-squares merging apply.

Tensors of an adapter: `{"<block path>.attn2.to_k": W (d_out, d_text), "<block path>.attn2.to_v": W, ...}`, full
weights, not deltas. On disk: diffusers' own file name and keys,
`<block path>.attn2.processor.to_k_custom_diffusion.weight` (see `read` / `write`).

This module is the reference implementation of the method protocol (adapters/registry.py PROTOCOL): every
method module has these verbs with these signatures. Custom Diffusion has no options (`options` is None).
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
METADATA_KEYS = ()  # nothing beyond the common adapter.json fields
_FILE_SUFFIX = {"to_k": ".processor.to_k_custom_diffusion.weight", "to_v": ".processor.to_v_custom_diffusion.weight"}


def training_options(settings: dict) -> None:
    """The method's options from a resolved TrainConfig dict: none for Custom Diffusion."""
    return None


def check_options(options, task: str) -> None:
    """Custom Diffusion takes no options; nothing to check."""


def make_trainable(unet, options=None) -> list[torch.nn.Parameter]:
    """Freeze the UNet, then unfreeze every attn2 K/V weight; return those parameters (SD1.5: 32 tensors, 19.2M)."""
    unet.requires_grad_(False)
    params = []
    for layer in cross_attention_kv_layers(unet).values():
        layer.weight.requires_grad_(True)
        params.append(layer.weight)
    return params


def is_adapter_parameter(name: str) -> bool:
    """Is this UNet parameter one that Custom Diffusion trains (an attn2 K/V weight)?"""
    return name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))


def extract(unet) -> dict[str, torch.Tensor]:
    """The current attn2 K/V weights as adapter tensors (fp32, CPU, detached copies)."""
    return {name: layer.weight.detach().to("cpu", torch.float32).clone() for name, layer in cross_attention_kv_layers(unet).items()}


def load_trainable(unet, tensors: dict[str, torch.Tensor]) -> None:
    """Resume: the saved K/V back into the (trainable) live weights."""
    swap_in(unet, tensors)


def live_kv_delta(unet, options, base_kv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Training: the change of every attn2 K/V weight from the base's (`base_kv`: fp32 copies taken before training),
    differentiable (train/preservation.py penalises it)."""
    return {name: layer.weight.float() - base_kv[name] for name, layer in cross_attention_kv_layers(unet).items()}


def targets(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths the adapter changes: every attn2 K/V it holds."""
    return sorted(tensors)


def rank(tensors, options=None) -> None:
    """Full weights have no adapter rank."""
    return None


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


def delta_weights(tensors: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor], options=None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """dW = W_task - W0 per layer, in `dtype` (merge asks for float64). Needs the base's K/V weights to subtract."""
    return {name: tensors[name].to(dtype) - base_weights[name].to(dtype) for name in tensors}


def from_deltas(deltas: dict[str, torch.Tensor], base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors W0 + dW for every base K/V layer (W0 where `deltas` has none), float32: what a merge writes."""
    return {name: (w0 + deltas[name]).to(torch.float32) if name in deltas else w0.to(torch.float32) for name, w0 in base_weights.items()}


def swap_in(unet, tensors: dict[str, torch.Tensor], layers: dict[str, torch.nn.Linear] | None = None) -> None:
    """Copy the task's K/V into the live weights in place: same Parameter objects, so compiled graphs stay valid.

    `layers` (from cross_attention_kv_layers) may be passed to skip walking the UNet on every swap.
    """
    layers = layers if layers is not None else cross_attention_kv_layers(unet)
    with torch.no_grad():
        for name, weight in tensors.items():
            layers[name].weight.copy_(weight)


def fuse_into_base(unet, tensors: dict[str, torch.Tensor], options=None) -> None:
    """Bake the adapter into the base for good (a Custom Diffusion adapter is full weights: fusing is swapping)."""
    swap_in(unet, tensors)


def write(folder: str, tensors: dict[str, torch.Tensor], options=None) -> None:
    """Write diffusers' Custom Diffusion file (full K/V weights under processor keys)."""
    file_sd = {}
    for name, weight in tensors.items():
        attn, proj = name.rsplit(".", 1)
        file_sd[attn + _FILE_SUFFIX[proj]] = weight.detach().to("cpu", torch.float32).contiguous()
    save_file(file_sd, os.path.join(folder, FILE_NAME), metadata={"format": "pt"})


def read(folder: str) -> tuple[dict[str, torch.Tensor], None]:
    """Read a Custom Diffusion folder (safetensors, or diffusers' legacy .bin without unpickling code).

    The `.bin` diffusers writes (`save_attn_procs(safe_serialization=False)`) holds `{}` for every attn1
    processor beside the attn2 tensors: those placeholders carry no weights and are skipped.
    """
    path = os.path.join(folder, FILE_NAME)
    if os.path.isfile(path):
        file_sd = load_safetensors(path)
    else:
        path = os.path.join(folder, LEGACY_FILE_NAME)
        file_sd = load_torch_bin(path, skip_empty=True)
    tensors = {}
    for key, value in file_sd.items():
        for proj, suffix in _FILE_SUFFIX.items():
            if key.endswith(suffix):
                tensors[key[: -len(suffix)] + "." + proj] = value.float()
                break
        else:
            raise AdapterkitError(_unsupported_key(key, os.path.basename(path)))
    if not tensors:
        raise AdapterkitError(f"{path} holds no Custom Diffusion weights")
    return tensors, None


def _unsupported_key(key: str, file_name: str) -> str:
    if "to_q_custom_diffusion" in key or "to_out_custom_diffusion" in key:
        # train_custom_diffusion.py trains to_q/to_out too with `--freeze_model crossattn`; its default
        # `crossattn_kv` writes only the K/V that adapterkit reads.
        return (f"{file_name} holds '{key}': a to_q/to_out weight, written by train_custom_diffusion.py with "
                "--freeze_model crossattn; adapterkit reads attn2 K/V only: retrain with --freeze_model crossattn_kv (the default)")
    return f"unsupported key '{key}' in {file_name}: adapterkit reads attn2 to_k/to_v Custom Diffusion weights only"


def metadata(tensors, options=None) -> dict:
    """Extra adapter.json entries: none."""
    return {}


def card(tensors: dict[str, torch.Tensor], options=None) -> tuple[str, str]:
    """(what the adapter is, how to load it in plain diffusers) for the model card."""
    # `folder` is defined by the card's preamble (record.model_card). unet.load_attn_procs ignores these weights in
    # diffusers <= 0.42 (diffusers#9320), so the card copies them; the comment line says so to the reader.
    load = (
        "# Custom Diffusion K/V: copied in by hand (unet.load_attn_procs ignores them in diffusers <= 0.42: diffusers#9320)\n"
        "from safetensors.torch import load_file\n"
        "modules = dict(pipe.unet.named_modules())\n"
        f"for key, weight in load_file(f\"{{folder}}/{FILE_NAME}\").items():\n"
        "    attn, name = key.split(\".processor.\")  # '<block>.attn2', 'to_k_custom_diffusion.weight'\n"
        "    modules[attn + \".\" + name.split(\"_custom_diffusion\")[0]].weight.data.copy_(weight)\n"
    )
    return f"Custom Diffusion: new cross-attention K/V weights for {len(tensors)} layers", load


class Swap:
    """How AdapterBank swaps Custom Diffusion adapters: copy_() K/V into the live weights, copy the base back.

    The base K/V are kept once (taken when the bank is made, before anything changes them); same Parameter
    objects throughout, so a compiled UNet is not recompiled.
    """

    def __init__(self, pipe):
        self._layers = cross_attention_kv_layers(pipe.unet)
        self._base = {name: layer.weight.detach().clone() for name, layer in self._layers.items()}
        self._dirty: set[str] = set()  # layers currently holding an adapter's weights

    def add(self, adapter) -> None:
        """Nothing to set up per adapter."""

    def prepare(self) -> None:
        """Nothing to create before torch.compile."""

    def activate(self, adapter) -> None:
        self.deactivate()
        swap_in(None, adapter.tensors, self._layers)
        self._dirty = set(adapter.tensors)

    def deactivate(self) -> None:
        if self._dirty:
            swap_in(None, {name: self._base[name] for name in self._dirty}, self._layers)
            self._dirty = set()

    def close(self) -> None:
        self.deactivate()


def batch_kv(tensors: dict[str, torch.Tensor], options=None) -> dict:
    """The adapter's K/V for a mixed batch (adapters/batched.py): every layer a full weight."""
    return {name: ("full", weight) for name, weight in tensors.items()}
