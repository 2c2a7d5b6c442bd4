"""AdapterBank: many task adapters in memory on one loaded pipeline, one active at a time, swapped in place.

- Custom Diffusion: the base K/V are kept once; activating copies the task's K/V into the live weights with
  `copy_()` (same Parameter objects, so a compiled UNet is not recompiled); deactivating copies the base back.
- LoRA: one live peft adapter slot named LIVE_LORA, sized for the widest rank and the union of target modules of
  every LoRA in the bank, loaded through diffusers after `enable_lora_hotswap` (which turns each layer's scaling
  into a tensor). Activating writes the task's A/B into the slot, zero-padded to the slot's rank, and its alpha/r
  into the scaling tensors, in place: what peft's hotswap does, but with the slot's tensors resolved once
  (diffusers' `load_lora_weights(hotswap=True)` walks the whole UNet several times per call: ~60 ms on the tiny
  base, see bench/swap.py). Deactivating writes scaling 0 in place: base output exactly, no recompile. We never call `set_adapters` or pass
  a LoRA `scale`: after a hotswap each layer keeps the first adapter's r/alpha, so those would compute the wrong
  strength and recompile (REFERENCE.md, hot-swap facts).
- Routing: an instruction goes to the task whose stored instructions are closest in the text encoder's pooled
  feature space (cosine), or to the base when the best cosine is below `route_threshold` (default 0.9). An
  instruction equal to a stored one (case and surrounding space ignored) always routes to its task.

All public methods take one re-entrant lock, and `edit` holds it across activate + inference: calls from many
threads are serialised, so every output comes from exactly the adapter it asked for.
"""

from __future__ import annotations

import threading

import torch

from ..base import Base, compute_fingerprint, cross_attention_kv_layers, unwrap_compiled
from ..errors import AdapterkitError
from . import Adapter, custom_diffusion, lora

# Distinctive: diffusers matches adapter names by substring in its warnings, so short names like "b" misfire.
LIVE_LORA = "adapterkit_live"
ROUTE_THRESHOLD = 0.9
AUTO = "auto"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@torch.no_grad()
def encode_instructions(pipe, texts: list[str]) -> torch.Tensor:
    """(n, d) unit vectors: the text encoder's pooled output (final-layer EOS token) of each instruction."""
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    device = pipe.text_encoder.device
    pooled = pipe.text_encoder(tokens.input_ids.to(device)).pooler_output.float()
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


class AdapterBank:
    """Hold adapters for one base and switch between them in place."""

    def __init__(self, base, route_threshold: float = ROUTE_THRESHOLD, force: bool = False):
        if not isinstance(base, Base):  # a bare pipeline: fingerprint it now, before anything changes K/V
            base = Base(pipe=base, name_or_path=getattr(base, "name_or_path", None) or "pipeline", fingerprint=compute_fingerprint(base.unet))
        self.base = base
        self.pipe = base.pipe
        self.route_threshold = route_threshold
        self.force = force
        self._lock = threading.RLock()
        if compute_fingerprint(self.pipe.unet) != base.fingerprint:
            raise AdapterkitError(
                "the base's K/V weights no longer match its fingerprint (another bank left an adapter active?); "
                "call deactivate() on the other bank or reload the base"
            )
        self._kv_layers = cross_attention_kv_layers(self.pipe.unet)
        self._base_kv = {name: layer.weight.detach().clone() for name, layer in self._kv_layers.items()}
        self._adapters: dict[str, Adapter] = {}
        self._features: dict[str, torch.Tensor] = {}
        self._active: str | None = None
        self._kv_dirty: set[str] = set()  # K/V layers currently holding a Custom Diffusion task's weights
        self._lora_slot: tuple[int, frozenset[str]] | None = None  # (rank, modules) of the live LoRA slot
        self._lora_on = False
        self._slot_tensors: dict = {}

    # ----------------------------------------------------------------------------------------------- contents
    @property
    def tasks(self) -> list[str]:
        return list(self._adapters)

    @property
    def active(self) -> str | None:
        return self._active

    def __contains__(self, task: str) -> bool:
        return task in self._adapters

    def get(self, task: str) -> Adapter:
        if task not in self._adapters:
            raise AdapterkitError(f"no adapter for task '{task}' in the bank; loaded tasks: {', '.join(self._adapters) or 'none'}")
        return self._adapters[task]

    def add(self, adapter: Adapter, force: bool | None = None) -> str:
        """Check the adapter against the base, keep its tensors on the UNet's device and dtype, index its instructions."""
        with self._lock:
            adapter.check_base(self.base, force=self.force if force is None else force)
            if adapter.task in self._adapters:
                raise AdapterkitError(f"the bank already holds a task named '{adapter.task}'; give the adapter another --task")
            weight = next(iter(self._kv_layers.values())).weight
            stored = Adapter(**{**adapter.__dict__, "tensors": {k: v.to(weight.device, weight.dtype) for k, v in adapter.tensors.items()}})
            self._adapters[adapter.task] = stored
            if adapter.instructions:
                self._features[adapter.task] = encode_instructions(self.pipe, adapter.instructions)
            if stored.method == lora.METHOD and self._lora_slot is not None and not self._slot_fits(stored):
                self._rebuild_lora_slot()
            return adapter.task

    # ------------------------------------------------------------------------------------------------ swapping
    def prepare(self) -> None:
        """Create the live LoRA slot for every LoRA added so far. Call it before torch.compile."""
        with self._lock:
            if self._lora_slot is None and any(a.method == lora.METHOD for a in self._adapters.values()):
                self._create_lora_slot()

    def activate(self, task: str | None) -> None:
        """Make `task` the active adapter (None: the base alone). Cheap when it is already active."""
        with self._lock:
            if task == self._active:
                return
            adapter = self.get(task) if task is not None else None
            self._restore_base_kv()
            if adapter is not None and adapter.method == custom_diffusion.METHOD:
                custom_diffusion.swap_in(self.pipe.unet, adapter.tensors, self._kv_layers)
                self._kv_dirty = set(adapter.tensors)
            if adapter is not None and adapter.method == lora.METHOD:
                self.prepare()
                lora.swap_into_slot(self._slot_tensors, adapter.tensors, adapter.lora, LIVE_LORA)
                self._lora_on = True
            elif self._lora_on:
                self._set_lora_scaling(0.0)
                self._lora_on = False
            self._active = task

    def deactivate(self) -> None:
        """Back to the base: base K/V copied back, LoRA slot scaled to zero. Output equals the base's exactly."""
        self.activate(None)

    def close(self) -> None:
        """Give the pipeline back as it came: base K/V restored and the live LoRA slot removed, so that another bank
        (or a later `evaluate`) can use the same Base. The bank holds no adapter afterwards."""
        with self._lock:
            self.deactivate()
            if self._lora_slot is not None:
                self.pipe.delete_adapters(LIVE_LORA)
                self._lora_slot, self._slot_tensors = None, {}
            self._adapters.clear()
            self._features.clear()

    def _restore_base_kv(self) -> None:
        if self._kv_dirty:
            custom_diffusion.swap_in(self.pipe.unet, {name: self._base_kv[name] for name in self._kv_dirty}, self._kv_layers)
            self._kv_dirty = set()

    def _lora_adapters(self) -> list[Adapter]:
        return [a for a in self._adapters.values() if a.method == lora.METHOD]

    def _slot_fits(self, adapter: Adapter) -> bool:
        rank, modules = self._lora_slot
        return adapter.rank <= rank and set(adapter.targets) <= modules

    def _create_lora_slot(self) -> None:
        """Load an all-zero LoRA of the widest rank over the union of targets, prepared for compiled hotswap."""
        adapters = self._lora_adapters()
        rank = max(a.rank for a in adapters)
        modules = sorted(set().union(*(a.targets for a in adapters)))
        named = dict(unwrap_compiled(self.pipe.unet).named_modules())
        zeros = {}
        weight_like = next(iter(self._kv_layers.values())).weight
        for m in modules:
            layer = named[m].get_base_layer() if hasattr(named[m], "get_base_layer") else named[m]
            d_out, d_in = layer.weight.shape
            zeros[f"{m}.lora_A.weight"] = torch.zeros(rank, d_in, dtype=weight_like.dtype)
            zeros[f"{m}.lora_B.weight"] = torch.zeros(d_out, rank, dtype=weight_like.dtype)
        if LIVE_LORA in (getattr(unwrap_compiled(self.pipe.unet), "peft_config", None) or {}):
            raise AdapterkitError(
                "this pipeline already carries the live LoRA slot of another AdapterBank; use that bank, or load the "
                "base afresh (load_base) for a new one"
            )
        # check_compiled="ignore": the UNet may carry other (deleted) peft configs; compilation comes after this.
        self.pipe.unet.enable_lora_hotswap(target_rank=rank, check_compiled="ignore")
        lora.load_into_pipeline(self.pipe, zeros, {"r": rank, "lora_alpha": float(rank), "target_modules": modules}, LIVE_LORA)
        self._lora_slot = (rank, frozenset(modules))
        self._slot_tensors = lora.live_slot(self.pipe.unet, LIVE_LORA)
        self._set_lora_scaling(0.0)  # the zero adapter is live; scaling 0 keeps it inert
        self._lora_on = False

    def _rebuild_lora_slot(self) -> None:
        unet = self.pipe.unet
        if hasattr(unet, "_orig_mod") or getattr(unet, "_compiled_call_impl", None) is not None:
            raise AdapterkitError(
                "this LoRA needs a wider live slot (higher rank or more target modules) but the UNet is already "
                "compiled; add every adapter to the bank (or call bank.prepare()) before torch.compile"
            )
        active = self._active
        self.activate(None)
        self.pipe.delete_adapters(LIVE_LORA)
        self._lora_slot = None
        self._create_lora_slot()
        self.activate(active)

    def _set_lora_scaling(self, value: float) -> None:
        """Write every live-slot layer's scaling in place (a tensor after enable_lora_hotswap: no recompile)."""
        for _a, _b, scaling in self._slot_tensors.values():
            if isinstance(scaling[LIVE_LORA], torch.Tensor):
                scaling[LIVE_LORA].fill_(value)
            else:
                scaling[LIVE_LORA] = value

    # ------------------------------------------------------------------------------------------------- routing
    def route(self, instruction: str) -> tuple[str | None, float]:
        """(task, cosine) of the closest stored instruction, or (None, best cosine) when below the threshold."""
        with self._lock:
            key = _normalise(instruction)
            for task, adapter in self._adapters.items():
                if any(_normalise(i) == key for i in adapter.instructions):
                    return task, 1.0
            if not self._features:
                return None, 0.0
            query = encode_instructions(self.pipe, [instruction])[0]
            best_task, best = None, -1.0
            for task, feats in self._features.items():
                score = float((feats @ query).max())
                if score > best:
                    best_task, best = task, score
            return (best_task, best) if best >= self.route_threshold else (None, best)

    # ---------------------------------------------------------------------------------------------------- edit
    def edit(self, image, instruction: str, task: str | None = AUTO, **options):
        """Edit one image. task=AUTO routes by instruction, None uses the base alone. Options as `run_pipeline`."""
        from ..inference import run_pipeline

        with self._lock:
            if task == AUTO:
                task, _score = self.route(instruction)
            self.activate(task)
            return run_pipeline(self.pipe, image, instruction, **options)
