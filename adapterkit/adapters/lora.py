"""LoRA through peft: a task is low-rank updates dW = (alpha / r) * B A on chosen UNet projections.

Tensors of an adapter use peft's keys without the adapter name: `<module>.lora_A.weight` (A: r x d_in) and
`<module>.lora_B.weight` (B: d_out x r). The config is LoraConfig keyword arguments (`r`, `lora_alpha`,
`target_modules`, and `rank_pattern`/`alpha_pattern` when modules differ). On disk: diffusers' LoRA file,
`pytorch_lora_weights.safetensors` with keys `unet.<module>.lora.down.weight` / `lora.up.weight` and the config in
the safetensors metadata, so `pipe.load_lora_weights(folder)` in plain diffusers gives the same model.
"""

from __future__ import annotations

import torch

from ..base import cross_attention_kv_layers, is_cross_attention_kv, unwrap_compiled, unwrap_peft
from ..errors import AdapterkitError
from .lora_io import FILE_NAME, LEGACY_FILE_NAME, load_into_pipeline, modules, read, to_diffusers_state_dict, write  # noqa: F401

METHOD = "lora"
METADATA_KEYS = ("lora", "rank", "targets")  # adapter.json: the LoraConfig kwargs, the rank, the target modules
TRAIN_ADAPTER = "adapterkit_train"  # peft adapter name of the LoRA being trained
# Distinctive: diffusers matches adapter names by substring in its warnings, so short names like "b" misfire.
LIVE_LORA = "adapterkit_live"
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


def training_options(settings: dict) -> dict:
    """LoraConfig kwargs from a resolved TrainConfig dict (its rank, lora_alpha and targets)."""
    return make_config(settings["rank"], settings["lora_alpha"], settings["targets"])


def check_options(options: dict | None, task: str) -> None:
    if not options:
        raise AdapterkitError(f"LoRA adapter '{task}' has no LoRA config (r, lora_alpha)")


def make_config(rank: int, alpha: float | None = None, targets: str | list[str] = "kv") -> dict:
    if rank < 1:
        raise AdapterkitError(f"LoRA rank must be at least 1, got {rank}")
    return {"r": int(rank), "lora_alpha": float(alpha if alpha is not None else rank), "target_modules": resolve_targets(targets)}


def make_trainable(unet, config: dict, adapter_name: str = TRAIN_ADAPTER) -> list[torch.nn.Parameter]:
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


def is_adapter_parameter(name: str) -> bool:
    """Is this UNet parameter a LoRA factor (peft names them `<module>.lora_A.<adapter>.weight`)?"""
    return ".lora_" in name


def extract(unet, adapter_name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The attached LoRA's tensors (peft keys without the adapter name), fp32 on CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}


def load_trainable(unet, tensors: dict[str, torch.Tensor], adapter_name: str = TRAIN_ADAPTER) -> None:
    """Resume: copy saved A/B into the attached (trainable) LoRA's parameters, in place."""
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            module, part = key.rsplit(".lora_", 1)  # "<module>", "A.weight"
            named[f"{module}.lora_{part[0]}.{adapter_name}.weight"].copy_(value)


def live_kv_delta(unet, config: dict, base_kv=None, adapter_name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """Training: scale * B @ A of the attached LoRA on every attn2 K/V module it wraps, differentiable (fp32).
    K/V modules without a LoRA (other --targets) are left out: they do not change."""
    from ..base import is_cross_attention_kv, unwrap_compiled

    out = {}
    for name, module in unwrap_compiled(unet).named_modules():
        if is_cross_attention_kv(name) and adapter_name in getattr(module, "lora_A", {}):
            b, a = module.lora_B[adapter_name].weight, module.lora_A[adapter_name].weight  # (d_out, r), (r, d_in)
            out[name] = scale(config, name) * (b.float() @ a.float())
    return out


def targets(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths the adapter changes."""
    return modules(tensors)


def rank(tensors: dict[str, torch.Tensor], options: dict) -> int:
    """The widest rank of any module (rank_pattern may give modules different ranks)."""
    ranks = [v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")]
    return max(ranks) if ranks else int(options["r"])


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


def delta_weights(tensors: dict[str, torch.Tensor], base_weights=None, config: dict | None = None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """dW = scale * B @ A per module: (d_out, r) @ (r, d_in) -> (d_out, d_in), the product formed in `dtype`."""
    return {
        m: scale(config, m) * (tensors[f"{m}.lora_B.weight"].to(dtype) @ tensors[f"{m}.lora_A.weight"].to(dtype))
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
        weight = unwrap_peft(layer).weight
        expected = (weight.shape[1], weight.shape[0])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != expected:
            raise AdapterkitError(
                f"adapter layer {m} maps {a.shape[-1]}->{b.shape[0]} features (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                f"but the base layer maps {expected[0]}->{expected[1]}; the adapter was made for another base"
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
            layer = unwrap_peft(named[m])
            layer.weight.add_(delta.to(layer.weight.dtype))


def metadata(tensors: dict[str, torch.Tensor], options: dict) -> dict:
    """adapter.json entries: the LoraConfig kwargs, the widest rank, the target modules."""
    return {"lora": options, "rank": rank(tensors, options), "targets": options["target_modules"]}


def card(tensors: dict[str, torch.Tensor], options: dict) -> tuple[str, str]:
    """(what the adapter is, how to load it in plain diffusers) for the model card."""
    what = f"LoRA (rank {rank(tensors, options)}, alpha {options['lora_alpha']}) on {len(modules(tensors))} UNet projections"
    return what, "pipe.load_lora_weights(folder)  # this folder's pytorch_lora_weights.safetensors\n"  # `folder`: the card's preamble


def from_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict]:
    """peft-keyed tensors and a config with scale 1 everywhere (lora_alpha = r; rank_pattern where ranks differ)
    from {module: (B (d_out, r), A (r, d_in))}: how a merge exports a LoRA.

    Rows of A are scaled to unit norm and B takes the scale: the same product, with balanced float32 factors.
    """
    tensors, ranks = {}, {}
    for name, (b, a) in sorted(factors.items()):
        if a.shape[0] == 0:
            continue
        norms = a.norm(dim=1).clamp_min(1e-30)  # (r,)
        tensors[f"{name}.lora_A.weight"] = (a / norms[:, None]).to(torch.float32).contiguous()
        tensors[f"{name}.lora_B.weight"] = (b * norms[None, :]).to(torch.float32).contiguous()
        ranks[name] = int(a.shape[0])
    if not ranks:
        return {}, {}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r))
    config = {"r": r_main, "lora_alpha": float(r_main), "target_modules": sorted(ranks)}
    pattern = {name: r for name, r in ranks.items() if r != r_main}
    if pattern:
        config["rank_pattern"] = pattern
        config["alpha_pattern"] = {name: float(r) for name, r in pattern.items()}
    return tensors, config


class Swap:
    """How AdapterBank swaps LoRA adapters: one live peft slot, written in place.

    The slot (adapter name LIVE_LORA) is sized for the widest rank and the union of target modules of every LoRA
    added, loaded through diffusers after `enable_lora_hotswap` (which turns each layer's scaling into a tensor).
    Activating writes the task's A/B into the slot, zero-padded to the slot's rank, and its alpha/r into the
    scaling tensors, in place: what peft's hotswap does, but with the slot's tensors resolved once (diffusers'
    `load_lora_weights(hotswap=True)` walks the whole UNet several times per call: ~60 ms on the tiny base, see
    bench/swap.py). Deactivating writes scaling 0 in place: base output exactly, no recompile. We never call
    `set_adapters` or pass a LoRA `scale`: after a hotswap each layer keeps the first adapter's r/alpha, so those
    would compute the wrong strength and recompile (REFERENCE.md, hot-swap facts).
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self._adapters: list = []
        self._slot: tuple[int, frozenset[str]] | None = None  # (rank, modules) of the live slot
        self._tensors: dict = {}  # live_slot(): module -> (A, B, scaling)
        self._active = None

    def add(self, adapter) -> None:
        """Remember the adapter; a slot too narrow for it is rebuilt (only possible before torch.compile)."""
        self._adapters.append(adapter)
        if self._slot is not None and not self._fits(adapter):
            self._rebuild()

    def prepare(self) -> None:
        """Create the live slot for every LoRA added so far. Call it before torch.compile."""
        if self._slot is None and self._adapters:
            self._create()

    def activate(self, adapter) -> None:
        self.prepare()
        swap_into_slot(self._tensors, adapter.tensors, adapter.options, LIVE_LORA)
        self._active = adapter

    def deactivate(self) -> None:
        if self._active is not None:
            self._set_scaling(0.0)
            self._active = None

    def close(self) -> None:
        """Remove the live slot, so another bank (or a later `evaluate`) can use the same pipeline."""
        self.deactivate()
        if self._slot is not None:
            self.pipe.delete_adapters(LIVE_LORA)
            self._slot, self._tensors = None, {}
        self._adapters.clear()

    def _fits(self, adapter) -> bool:
        slot_rank, slot_modules = self._slot
        return rank(adapter.tensors, adapter.options) <= slot_rank and set(modules(adapter.tensors)) <= slot_modules

    def _create(self) -> None:
        """Load an all-zero LoRA of the widest rank over the union of targets, prepared for compiled hotswap."""
        slot_rank = max(rank(a.tensors, a.options) for a in self._adapters)
        slot_modules = sorted(set().union(*(modules(a.tensors) for a in self._adapters)))
        named = dict(unwrap_compiled(self.pipe.unet).named_modules())
        dtype = next(iter(cross_attention_kv_layers(self.pipe.unet).values())).weight.dtype  # the UNet's dtype
        zeros = {}
        for m in slot_modules:
            d_out, d_in = unwrap_peft(named[m]).weight.shape
            zeros[f"{m}.lora_A.weight"] = torch.zeros(slot_rank, d_in, dtype=dtype)
            zeros[f"{m}.lora_B.weight"] = torch.zeros(d_out, slot_rank, dtype=dtype)
        if LIVE_LORA in (getattr(unwrap_compiled(self.pipe.unet), "peft_config", None) or {}):
            raise AdapterkitError(
                "this pipeline already carries the live LoRA slot of another AdapterBank; use that bank, or load the "
                "base afresh (load_base) for a new one"
            )
        # check_compiled="ignore": the UNet may carry other (deleted) peft configs; compilation comes after this.
        self.pipe.unet.enable_lora_hotswap(target_rank=slot_rank, check_compiled="ignore")
        load_into_pipeline(self.pipe, zeros, {"r": slot_rank, "lora_alpha": float(slot_rank), "target_modules": slot_modules}, LIVE_LORA)
        self._slot = (slot_rank, frozenset(slot_modules))
        self._tensors = live_slot(self.pipe.unet, LIVE_LORA)
        self._set_scaling(0.0)  # the zero adapter is live; scaling 0 keeps it inert
        self._active = None

    def _rebuild(self) -> None:
        unet = self.pipe.unet
        if hasattr(unet, "_orig_mod") or getattr(unet, "_compiled_call_impl", None) is not None:
            raise AdapterkitError(
                "this LoRA needs a wider live slot (higher rank or more target modules) but the UNet is already "
                "compiled; add every adapter to the bank (or call bank.prepare()) before torch.compile"
            )
        active = self._active
        self.deactivate()
        self.pipe.delete_adapters(LIVE_LORA)
        self._slot = None
        self._create()
        if active is not None:
            self.activate(active)

    def _set_scaling(self, value: float) -> None:
        """Write every live-slot layer's scaling in place (a tensor after enable_lora_hotswap: no recompile)."""
        for _a, _b, scaling in self._tensors.values():
            if isinstance(scaling[LIVE_LORA], torch.Tensor):
                scaling[LIVE_LORA].fill_(value)
            else:
                scaling[LIVE_LORA] = value


def batch_kv(tensors: dict[str, torch.Tensor], config: dict) -> dict:
    """The adapter's K/V for a mixed batch (adapters/batched.py): (A, B, alpha/r) per attn2 to_k/to_v module.

    Only attn2 K/V can differ per image of one UNet batch; a LoRA on other modules (--targets attn) is refused."""
    others = [m for m in modules(tensors) if not is_cross_attention_kv(m)]
    if others:
        raise AdapterkitError(
            f"a LoRA on modules other than attn2 to_k/to_v ({others[0]}, {len(others)} in all) cannot share a batch "
            "with other adapters (only cross-attention K/V differ per image); edit its images in a batch of their own "
            "(one task per edit_batch call) or train it with --targets kv"
        )
    return {m: ("lora", (tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"], scale(config, m))) for m in modules(tensors)}
