"""AdapterBank: many task adapters in memory on one loaded pipeline, one active at a time, swapped in place.

- Swapping is the method's own: each method module has a `Swap` strategy (adapters/registry.py) that the bank
  drives with add / prepare / activate / deactivate / close. Custom Diffusion copies K/V into the live weights
  (custom_diffusion.Swap); LoRA writes into one live peft slot (lora.Swap). Both keep the same Parameter objects,
  so a compiled UNet is not recompiled, and deactivating gives the base's output exactly.
- Routing (adapters/routing.py): an instruction goes to the task of best score (tf-idf word evidence against the
  task's stored instructions, plus the text encoder's pooled cosine), or to the base when that score is below
  `route_threshold`: calibrated per bank, leave-one-out on its own stored instructions, unless set by hand. An
  instruction equal to a stored one (case and surrounding space ignored) always routes to its task; one equal to
  an instruction the base records as its own (adapterkit_base.json "instructions": builtin:tiny's general edits)
  and stored by no adapter routes to the base, whatever words it shares with a task ("invert the colors" went to
  a colour-cast adapter in bench/fresh_tasks.py).
- edit_batch (adapters/batch_edit.py): different tasks and seeds in one pipeline call (per-row attn2 K/V).

All public methods take one re-entrant lock, and `edit` holds it across activate + inference: calls from many
threads are serialised, so every output comes from exactly the adapter it asked for.
"""

from __future__ import annotations

import threading

import torch

from ..base import Base, compute_fingerprint, cross_attention_kv_layers
from ..errors import AdapterkitError
from ..inference import encode_text
from . import batched
from .record import Adapter
from .routing import Router, normalise_instruction, read_background
from .residency import Residency, state_bytes
from .registry import get_method, method_names
from .tokens import TokenSwap

AUTO = "auto"


@torch.no_grad()
def encode_instructions(pipe, texts: list[str]) -> torch.Tensor:
    """(n, d) unit vectors: the text encoder's pooled output (final-layer EOS token) of each instruction."""
    pooled = encode_text(pipe.tokenizer, pipe.text_encoder, texts).pooled
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


class AdapterBank:
    """Hold adapters for one base and switch between them in place."""

    def __init__(self, base, route_threshold: float | None = None, force: bool = False, max_resident: int | None = None):
        if not isinstance(base, Base):  # a bare pipeline: fingerprint it now, before anything changes K/V
            base = Base(pipe=base, name_or_path=getattr(base, "name_or_path", None) or "pipeline", fingerprint=compute_fingerprint(base.unet))
        self.base = base
        self.pipe = base.pipe
        self._route_threshold = route_threshold  # None: calibrated per bank
        self.force = force
        self._lock = threading.RLock()
        if compute_fingerprint(self.pipe.unet) != (base.loaded_fingerprint or base.fingerprint):
            raise AdapterkitError(
                "the base's K/V weights no longer match its fingerprint (another bank left an adapter active?); "
                "call deactivate() on the other bank or reload the base"
            )
        self._kv_layers = cross_attention_kv_layers(self.pipe.unet)
        # One swap strategy per method, made now: Custom Diffusion's keeps the base K/V as they are at this point.
        self._swaps = {name: get_method(name).Swap(self.pipe) for name in method_names()}
        self._tokens = TokenSwap(self.pipe)  # modifier tokens (tokens.py): the active adapter's embeddings only
        self._adapters: dict[str, Adapter] = {}
        self._router = Router(lambda texts: encode_instructions(self.pipe, texts), read_background())
        self._router_stale = True
        self._base_instructions = {normalise_instruction(i) for i in base.instructions}
        self._active: str | None = None
        self._residency = Residency(next(iter(self._kv_layers.values())).weight.device, max_resident)
        self._row_weights: dict = {}  # task -> batched.RowWeights, made on first use in edit_batch
        # Per-sample K/V processors (adapters/batched.py): without their keyword they run the original processors.
        self._processors = batched.install(self.pipe.unet, {name.rsplit(".", 1)[0] for name in self._kv_layers})

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
            self._tokens.add(stored)
            self._router_stale = True
            self._swap(stored.method).add(stored)
            self.touch(adapter.task)
            return adapter.task

    # ------------------------------------------------------------------------------------------------ swapping
    def _swap(self, method: str):
        if method not in self._swaps:  # a method registered after this bank was made
            self._swaps[method] = get_method(method).Swap(self.pipe)
        return self._swaps[method]

    def prepare(self) -> None:
        """Let every method set up what swapping needs (LoRA: the live slot) for the adapters added so far.
        Call it before torch.compile."""
        with self._lock:
            for swap in self._swaps.values():
                swap.prepare()

    def activate(self, task: str | None) -> None:
        """Make `task` the active adapter (None: the base alone). Cheap when it is already active."""
        with self._lock:
            if task == self._active:
                return
            adapter = self.get(task) if task is not None else None
            if task is not None:
                self.touch(task)
            previous = self._adapters[self._active].method if self._active is not None else None
            if previous is not None and (adapter is None or adapter.method != previous):
                self._swaps[previous].deactivate()
            if adapter is not None:
                self._swap(adapter.method).activate(adapter)  # replaces an active adapter of the same method
            self._tokens.activate(adapter)
            self._active = task

    def deactivate(self) -> None:
        """Back to the base. Output equals the base's exactly."""
        self.activate(None)

    def close(self) -> None:
        """Give the pipeline back as it came (base K/V restored, the live LoRA slot removed), so that another bank
        (or a later `evaluate`) can use the same Base. The bank holds no adapter afterwards."""
        with self._lock:
            self.deactivate()
            for swap in self._swaps.values():
                swap.close()
            self._tokens.close()
            self._adapters.clear()
            self._router_stale = True
            self._row_weights.clear()
            self._residency = Residency(self._residency.device, self._residency.max_resident)
            batched.uninstall(self.pipe.unet, self._processors)

    # ------------------------------------------------------------------------------------------------- routing
    @property
    def route_threshold(self) -> float:
        """The score below which an instruction goes to the base: set by hand, or calibrated for this bank."""
        with self._lock:
            return self._route_threshold if self._route_threshold is not None else self._calibrated().threshold

    @route_threshold.setter
    def route_threshold(self, value: float | None) -> None:
        self._route_threshold = value  # None: back to the calibrated threshold

    def _calibrated(self) -> Router:
        if self._router_stale:
            self._router.set_tasks({t: a.instructions for t, a in self._adapters.items()})
            self._router.calibrate()
            self._router_stale = False
        return self._router

    def route(self, instruction: str) -> tuple[str | None, float]:
        """(task, score) of the best task, or (None, best score) when below route_threshold; (task, 1.0) for a
        stored instruction; (None, 1.0) for one the base records as its own that no adapter stores."""
        details = self.route_details(instruction)
        return details["task"], details["score"]

    def route_details(self, instruction: str) -> dict:
        """How `route` decided: the task (None: the base), its score, every task's score, the threshold and the
        calibration (alpha, leave-one-out balanced accuracy of this bank's stored instructions)."""
        with self._lock:
            router = self._calibrated()
            threshold = self.route_threshold
            key = normalise_instruction(instruction)
            for task, adapter in self._adapters.items():
                if any(normalise_instruction(i) == key for i in adapter.instructions):
                    return {"task": task, "score": 1.0, "scores": {task: 1.0}, "threshold": threshold,
                            "stored": True, "calibration": router.calibration}
            if key in self._base_instructions:  # the base's own edit, which no adapter claims
                return {"task": None, "score": 1.0, "scores": {}, "threshold": threshold, "stored": True,
                        "base_instruction": True, "calibration": router.calibration}
            scores = router.scores(instruction) if router.tasks else {}
            best = max(scores, key=scores.get) if scores else None
            score = scores[best] if best is not None else 0.0
            return {"task": best if best is not None and score >= threshold else None, "score": score,
                    "scores": scores, "threshold": threshold, "stored": False, "calibration": router.calibration}

    # ---------------------------------------------------------------------------------------------------- edit
    def edit(self, image, instruction: str, task: str | None = AUTO, **options):
        """Edit one image. task=AUTO routes by instruction, None uses the base alone. Options as `run_pipeline`.
        Like the diffusers pipeline, it returns sides rounded down to the VAE's multiple; `adapterkit edit` and
        `serve` resize back to the input's size (`adapterkit.inference.at_input_size`)."""
        from ..inference import run_pipeline

        with self._lock:
            if task == AUTO:
                task, _score = self.route(instruction)
            self.activate(task)
            return run_pipeline(self.pipe, image, instruction, **options)

    def edit_batch(self, images, instructions, tasks=None, seeds=None, **options) -> list:
        """Edit many images in one pipeline call per image size, each with its own task and seed.

        tasks[i]: a task name, None for the base, or AUTO to route by instruction; tasks=None routes every image.
        seeds default to 0 each. Options as `run_pipeline` (steps, guidance, image_guidance, resolution,
        output_type), and `stop`: a callable checked between denoising steps; once it returns True the call raises
        `batch_edit.Stopped` (a server stops a batch whose every request was abandoned). Each output equals
        `edit(images[i], instructions[i], task=tasks[i], seed=seeds[i], **options)` up to float rounding: attn2 K/V
        adapters are applied per image (adapters/batch_edit.py)."""
        from .batch_edit import edit_batch

        with self._lock:
            return edit_batch(self, list(images), list(instructions), tasks, seeds, **options)

    @property
    def kv_layers(self) -> dict:
        """attn2 to_k / to_v path -> the live base Linear (what the batched K/V path projects with)."""
        return self._kv_layers

    def row_weights(self, task: str):
        """The task's K/V as the batched path reads them (cached; raises for adapters that cannot be mixed)."""
        from .batch_edit import row_weights

        if task not in self._row_weights:
            self._row_weights[task] = row_weights(self.get(task))
        return self._row_weights[task]

    def touch(self, task: str) -> None:
        """Mark the task as just used: paged in to the UNet's device if it was out, the least recently used beyond
        `max_resident` paged out to CPU."""
        with self._lock:
            if self._residency.touch(self.get(task)):
                self._row_weights.clear()  # cached K/V views of tensors that moved

    @property
    def resident(self) -> list[str]:
        """Tasks whose tensors are on the UNet's device, least recently used first (at most max_resident)."""
        return self._residency.resident

    @property
    def max_resident(self) -> int | None:
        return self._residency.max_resident

    def state_bytes(self, task: str) -> int:
        """Bytes of one adapter's tensors: what it costs resident."""
        return state_bytes(self.get(task))
