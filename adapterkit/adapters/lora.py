"""LoRA through peft: a task is low-rank updates dW = (alpha / r) * B A on chosen UNet projections.

Tensors of an adapter use peft's keys without the adapter name: `<module>.lora_A.weight` (A: r x d_in) and
`<module>.lora_B.weight` (B: d_out x r). The config is LoraConfig keyword arguments (`r`, `lora_alpha`,
`target_modules`, and `rank_pattern`/`alpha_pattern` when modules differ). On disk: diffusers' LoRA file,
`pytorch_lora_weights.safetensors` with keys `unet.<module>.lora.down.weight` / `lora.up.weight` and the config in
the safetensors metadata, so `pipe.load_lora_weights(folder)` in plain diffusers gives the same model.
"""

from __future__ import annotations

import os

import torch

from ..base import unwrap_compiled
from ..errors import AdapterkitError
from .safe_load import check_tensors

METHOD = "lora"
FILE_NAME = "pytorch_lora_weights.safetensors"
LEGACY_FILE_NAME = "pytorch_lora_weights.bin"
# --targets presets: suffixes of module paths, as peft matches them.
TARGET_PRESETS = {
    "kv": ["attn2.to_k", "attn2.to_v"],  # cross-attention K/V: mergeable by least squares
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],  # every projection of self- and cross-attention
}


def resolve_targets(targets: str | list[str]) -> list[str]:
    """A preset name ("kv", "attn") or a comma-separated list of module-path suffixes."""
    if isinstance(targets, (list, tuple)):
        return list(targets)
    if targets in TARGET_PRESETS:
        return list(TARGET_PRESETS[targets])
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise AdapterkitError("--targets is empty; use kv, attn, or a comma-separated list of module names")
    return names


def make_config(rank: int, alpha: float | None = None, targets: str | list[str] = "kv") -> dict:
    if rank < 1:
        raise AdapterkitError(f"LoRA rank must be at least 1, got {rank}")
    return {"r": int(rank), "lora_alpha": float(alpha if alpha is not None else rank), "target_modules": resolve_targets(targets)}


def make_trainable(unet, config: dict, adapter_name: str = "adapterkit_train") -> list[torch.nn.Parameter]:
    """Freeze the UNet and attach a fresh peft LoRA (gaussian A, zero B: the model starts equal to the base)."""
    from peft import LoraConfig

    _refuse_non_linear_targets(unet, config["target_modules"])
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(init_lora_weights="gaussian", **config), adapter_name=adapter_name)
    params = [p for n, p in unet.named_parameters() if ".lora_" in n and f".{adapter_name}." in n]
    if not params:
        raise AdapterkitError(f"LoRA targets {config['target_modules']} matched no module of this UNet; check --targets")
    for p in params:
        p.requires_grad_(True)
    return params


def _refuse_non_linear_targets(unet, targets: list[str]) -> None:
    """peft would wrap a Conv2d too, but adapterkit's LoRA files, bank, swap and merge handle (out, in) Linear
    matrices only: a conv LoRA would train and then fail to load. Matching rule as peft's: the name or its suffix."""
    for name, module in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets) and not isinstance(module, torch.nn.Linear):
            raise AdapterkitError(
                f"LoRA target {name} is a {type(module).__name__}; adapterkit's LoRA adapters target Linear layers only: "
                "use --targets kv, attn, or names of attention projections (to_k, to_v, to_q, to_out.0, ff.net.2)"
            )


def extract(unet, adapter_name: str = "adapterkit_train") -> dict[str, torch.Tensor]:
    """The attached LoRA's tensors (peft keys without the adapter name), fp32 on CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in tensors})


def scale(config: dict, module: str) -> float:
    """alpha / r for one module, honouring rank_pattern / alpha_pattern as peft does."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"]) if rank_pattern else config["r"]
    alpha = (
        alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
        if alpha_pattern
        else config["lora_alpha"]
    )
    return float(alpha) / float(r)


def delta_weights(tensors: dict[str, torch.Tensor], base_weights=None, config: dict | None = None) -> dict[str, torch.Tensor]:
    """dW = scale * B @ A per module: (d_out, r) @ (r, d_in) -> (d_out, d_in), float32."""
    return {
        m: scale(config, m) * (tensors[f"{m}.lora_B.weight"].float() @ tensors[f"{m}.lora_A.weight"].float())
        for m in modules(tensors)
    }


def check_shapes(tensors: dict[str, torch.Tensor], unet) -> None:
    """Raise on the first module that this UNet lacks or whose in/out features differ from the adapter's."""
    named = dict(unwrap_compiled(unet).named_modules())
    for m in modules(tensors):
        a, b = tensors.get(f"{m}.lora_A.weight"), tensors.get(f"{m}.lora_B.weight")
        if a is None or b is None:
            raise AdapterkitError(f"LoRA module {m} lacks its lora_A or lora_B tensor; the file is incomplete")
        layer = named.get(m)
        if layer is None:
            raise AdapterkitError(f"adapter layer {m} does not exist in this base; the adapter was made for another UNet")
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        weight = layer.weight
        expected = (weight.shape[1], weight.shape[0])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != expected:
            raise AdapterkitError(
                f"adapter layer {m} maps {a.shape[-1]}->{b.shape[0]} features (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                f"but the base layer maps {expected[0]}->{expected[1]}; the adapter was made for another base"
            )


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
        raise AdapterkitError(f"{path} is not a LoRA file diffusers can read ({str(e).splitlines()[0][:160]})") from e
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


def live_slot(unet, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """Module path -> (lora_A weight (R, d_in), lora_B weight (d_out, R), the layer's scaling dict) of a loaded adapter."""
    slot = {}
    for name, module in unwrap_compiled(unet).named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a:
            slot[name] = (lora_a[adapter_name].weight, module.lora_B[adapter_name].weight, module.scaling)
    return slot


def swap_into_slot(slot: dict, tensors: dict[str, torch.Tensor], config: dict, adapter_name: str) -> None:
    """Write an adapter into a live slot in place, as peft's hotswap does, without walking the model each time.

    A (r, d_in) fills rows [:r] of the slot's (R, d_in), B (d_out, r) columns [:r] of (d_out, R); the rest is zero,
    so B_slot @ A_slot == B @ A exactly. Each layer's scaling tensor gets alpha/r of the new adapter. Slot modules
    the adapter does not target are zeroed. Same Parameter objects throughout: a compiled UNet does not recompile.
    """
    with torch.no_grad():
        for module, (slot_a, slot_b, scaling) in slot.items():
            a = tensors.get(f"{module}.lora_A.weight")
            if a is None:
                slot_a.zero_()
                slot_b.zero_()
                continue
            r = a.shape[0]
            slot_a[:r].copy_(a)
            slot_a[r:].zero_()
            slot_b[:, :r].copy_(tensors[f"{module}.lora_B.weight"])
            slot_b[:, r:].zero_()
            value = scale(config, module)
            if isinstance(scaling[adapter_name], torch.Tensor):
                scaling[adapter_name].fill_(value)
            else:
                scaling[adapter_name] = value


def fuse_into_base(unet, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Add scale * B A to each target weight for good (no peft layers left behind)."""
    named = dict(unwrap_compiled(unet).named_modules())
    with torch.no_grad():
        for m, delta in delta_weights(tensors, config=config).items():
            layer = named[m]
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            layer.weight.add_(delta.to(layer.weight.dtype))
