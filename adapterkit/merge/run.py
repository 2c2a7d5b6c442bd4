"""How adapters are combined: `merge(adapters, base, method, ...)` -> one adapter (and optionally a fused pipeline).

Every input, Custom Diffusion or LoRA, becomes full weights W_i = W0 + dW_i on each attn2 K/V layer (a LoRA gives
dW = scale * B A). Methods:
- "lsq" / "lsq-soft": constrained least squares on K/V (lsq.py) with the tasks' instructions as targets and
  regularization prompts keeping the base elsewhere (features.py). LoRA modules outside attn2 K/V (trained with
  `--targets attn`) are not text-fed, so least squares does not apply: they are merged with `other_modules`
  ("linear" by default, or "sum") and the report says so.
- "sum", "linear", "ties", "dare", "svd": exact baselines on full deltas of every module (baselines.py).

The result is a Custom Diffusion adapter (full K/V) or, with `as_lora`, a LoRA: the lsq update exactly as rank-m
factors, other updates factored by SVD at their numerical rank (`rank` for svd). Its adapter.json holds the union of
the sources' instructions (so a bank routes every task to it) and {"merge": {"method", "sources", "options", "report"}}.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

# Merge outputs are one of two adapter formats, named here on purpose: full K/V (Custom Diffusion) or, with
# --as-lora, a LoRA. Inputs of any method go through the method protocol (Adapter.delta_weights).
from ..adapters import custom_diffusion, lora
from ..adapters.record import Adapter, MergeRecord, load_adapter, save_adapter
from ..base import BASE_INFO_FILE, Base, cross_attention_kv_layers, load_base, unwrap_peft
from ..errors import AdapterkitError
from ..fileio import atomic_folder
from . import baselines, features, lsq, report as reporting
from .methods import MergeOptions, check_options


@dataclass
class MergeResult:
    adapter: Adapter  # the merged adapter (saved to `path` when an output was given)
    report: dict
    path: str | None = None
    pipeline_path: str | None = None

    @property
    def table(self) -> str:
        return reporting.format_table(self.report)


@dataclass
class _Inputs:
    adapters: list[Adapter]
    base_weights: dict[str, torch.Tensor]  # K/V layer -> W0 (d_out, d_text) float64
    kv: list[dict[str, torch.Tensor]]  # per adapter: K/V layer -> dW_i float64 (layers it changes)
    other: list[dict[str, torch.Tensor]]  # per adapter: other module -> dW_i float64 (LoRA --targets attn)


def merge(
    adapters: list,
    base,
    method: str = "lsq",
    output: str | None = None,
    *,
    weights: list[float] | None = None,
    density: float = baselines.DEFAULT_DENSITY,
    seed: int = 0,
    rank: int | None = None,
    target_weight: float = lsq.DEFAULT_TARGET_WEIGHT,
    ridge: float = lsq.DEFAULT_RIDGE,
    reg_prompts: str | list[str] | None = None,
    positions: str = "eos",
    other_modules: str = "linear",
    as_lora: bool = False,
    task: str | None = None,
    output_pipeline: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> MergeResult:
    """Merge adapters (folders or Adapter objects) made on `base` (a Base or a name for load_base).

    weights: per adapter, for the baselines. density: ties/dare keep fraction. seed: dare's masks. rank: svd's
    truncation. target_weight: lsq-soft's lambda. ridge: relative ridge on M. reg_prompts: a file or a list (the
    built-in set when None; "" is always added). positions: "eos" or "all" (features.py). output_pipeline: also
    write the base with the merge fused in, as a full diffusers pipeline.
    """
    start = time.perf_counter()
    options = MergeOptions(weights=weights, density=density, seed=seed, rank=rank, target_weight=target_weight,
                           ridge=ridge, positions=positions, other_modules=other_modules, as_lora=as_lora)
    spec = check_options(method, options, count=len(adapters) or None)  # every option checked before any work
    base = base if isinstance(base, Base) else load_base(base)
    inputs = _prepare_inputs(adapters, base, force, as_lora)
    timings = {"load": time.perf_counter() - start}
    features_start = time.perf_counter()
    prompts, gram, reg_rows, targets = _text_features(base, inputs, reg_prompts, positions, quiet)
    timings["features"] = time.perf_counter() - features_start

    solve_start = time.perf_counter()
    kv_deltas, kv_factors, other, solve_info = _solve(spec, options, inputs, targets, gram)
    timings["solve"] = time.perf_counter() - solve_start
    report_start = time.perf_counter()
    merge_report = _build_report(spec, inputs, targets, kv_deltas, kv_factors, gram, solve_info)
    merge_report.update(
        positions=positions if spec.family == "lsq" else None,
        regularization={"prompts": len(prompts), "rows": reg_rows, "source": reg_prompts if isinstance(reg_prompts, str) else ("list" if reg_prompts else "builtin")},
        other_modules={"count": len(other), "method": other_modules if spec.family == "lsq" else method} if other else None,
    )
    timings["report"] = time.perf_counter() - report_start
    merged_adapter = _build_adapter(inputs, base, kv_deltas, kv_factors, other, as_lora, rank if "rank" in spec.reads else None, task)
    merge_report["time_s"] = {**timings, "total": time.perf_counter() - start}
    record = MergeRecord(method=method, sources=_sources(inputs, weights), options=dataclasses.asdict(options), report=merge_report)
    merged_adapter.extra = {"merge": record.to_dict()}
    result = MergeResult(adapter=merged_adapter, report=merge_report)
    if output:
        result.path = save_adapter(merged_adapter, output)
    if output_pipeline:
        result.pipeline_path = fuse_into_pipeline(base, merged_adapter, output_pipeline)
    return result


def _prepare_inputs(adapters: list, base: Base, force: bool, as_lora: bool) -> _Inputs:
    """Load folders, refuse other bases, and turn every adapter into float64 deltas on K/V and other modules."""
    if not adapters:
        raise AdapterkitError("nothing to merge; pass one or more adapter folders")
    loaded = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    for adapter in loaded:
        adapter.check_base(base, force=force)
    kv_layers = cross_attention_kv_layers(base.unet)
    base_weights = {name: layer.weight.detach().to("cpu", torch.float64) for name, layer in kv_layers.items()}
    kv, other = [], []
    for adapter in loaded:
        deltas = _full_deltas(adapter, base_weights)
        kv.append({k: v for k, v in deltas.items() if k in base_weights})
        other.append({k: v for k, v in deltas.items() if k not in base_weights})
    if any(other) and not as_lora:
        raise AdapterkitError(
            "some LoRA inputs change modules outside attn2 K/V (trained with --targets attn), which a Custom Diffusion "
            "adapter cannot hold; pass --as-lora"
        )
    return _Inputs(loaded, base_weights, kv, other)


def _full_deltas(adapter: Adapter, base_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module -> dW_i in float64, products formed in float64 (the method's delta_weights: W_i - W0, scale * B A, ...)."""
    return adapter.delta_weights(base_weights, dtype=torch.float64)


def _text_features(base: Base, inputs: _Inputs, reg_prompts, positions: str, quiet: bool):
    """(regularization prompts, their Gram matrix, its row count, the tasks' target rows) (features.py, lsq.py)."""
    prompts = features.read_prompts(reg_prompts) if not isinstance(reg_prompts, list) else sorted(set(reg_prompts) | {""})
    gram, reg_rows = features.regularization_gram(base, prompts, quiet=quiet)
    text_features = features.instruction_features(base, [t for a in inputs.adapters for t in a.instructions], positions, quiet=quiet)
    targets = lsq.build_targets(text_features, [a.instructions for a in inputs.adapters], [a.task for a in inputs.adapters])
    return prompts, gram, reg_rows, targets


def _solve(spec, options: MergeOptions, inputs: _Inputs, targets: lsq.Targets, gram):
    """(K/V deltas, K/V factors or None, other modules' deltas, solve info) of the merge `spec` with `options`."""
    if spec.family == "lsq":
        kv_factors, solve_info = _solve_lsq(spec.exact, inputs, targets, gram, options.ridge, options.target_weight)
        kv_deltas = {name: b @ a for name, (b, a) in kv_factors.items()}
        other = baselines.combine(options.other_modules, inputs.other) if any(inputs.other) else {}
        return kv_deltas, kv_factors, other, solve_info
    all_deltas = [{**kv, **other} for kv, other in zip(inputs.kv, inputs.other)]
    merged = baselines.combine(spec.name, all_deltas, options.weights, options.density, options.seed, options.rank)
    kv_deltas = {k: v for k, v in merged.items() if k in inputs.base_weights}
    other = {k: v for k, v in merged.items() if k not in inputs.base_weights}
    return kv_deltas, None, other, {}


def _solve_lsq(exact: bool, inputs: _Inputs, targets: lsq.Targets, gram, ridge, target_weight):
    """Shared factors once, then per layer B = R L and A: {layer: (B (d_out, m), A (m, d_text))}."""
    missing = [a.task for a, rows in zip(inputs.adapters, targets.task_rows) if rows.shape[0] == 0]
    if missing:
        raise AdapterkitError(
            f"adapter(s) {', '.join(missing)} store no instructions, which least squares needs as targets; add them to "
            "adapter.json ('instructions') or use a baseline method (--method linear)"
        )
    info = {"constraint_rows": int(targets.rows.shape[0]), "d_text": int(targets.rows.shape[1])}
    if exact:
        per_task = {a.task: (int(r.shape[0]), len(a.instructions)) for a, r in zip(inputs.adapters, targets.task_rows)}
        left, right, condition = lsq.exact_projection(gram, targets.rows, ridge, per_task)
        info["condition_number"] = condition
    else:
        left, right = lsq.soft_projection(gram, targets.rows, targets.weights, target_weight, ridge)
        info["target_weight"] = target_weight
    factors = {}
    for name, w0 in inputs.base_weights.items():
        deltas = [kv.get(name) for kv in inputs.kv]
        factors[name] = lsq.solve_layer(deltas, targets, left, right, w0.shape[0])
    return factors, info


def _build_report(spec, inputs: _Inputs, targets: lsq.Targets, kv_deltas, kv_factors, gram, solve_info) -> dict:
    tasks = []
    base_energy = reporting.energies(inputs.base_weights, gram)  # ||W0 C_reg^T||^2 per layer, shared by every drift
    for adapter, kv, rows, own in zip(inputs.adapters, inputs.kv, targets.task_rows, targets.own_rows):
        shared = rows.shape[0] - own.shape[0]
        tasks.append({
            "task": adapter.task,
            "source": adapter.path,
            "instructions": len(adapter.instructions),
            "target_rows": int(rows.shape[0]),
            "shared_rows": int(shared),
            # On the rows the task owns alone (what exact lsq reproduces), and on all its rows, shared ones included.
            "residual": reporting.task_residual(kv_deltas, kv, own),
            "residual_all_rows": reporting.task_residual(kv_deltas, kv, rows) if shared else None,
            "source_drift": reporting.drift(kv, base_energy, gram),
        })
    if kv_factors is not None:
        ranks = [reporting.factored_rank(b, a) for b, a in kv_factors.values()]
        merged_drift = reporting.drift({n: (b, a) for n, (b, a) in kv_factors.items()}, base_energy, gram)
    else:
        ranks = [reporting.dense_rank(d) for d in kv_deltas.values()]
        merged_drift = reporting.drift(kv_deltas, base_energy, gram)
    warnings = []
    if spec.family == "lsq" and tasks and merged_drift > max(t["source_drift"] for t in tasks):
        # Exact targets on nearly equal rows with different values force large changes along their small difference.
        warnings.append(
            "the merge drifts more on regularization prompts than any source adapter: some tasks' instruction features "
            "are nearly the same with conflicting targets; try --method lsq-soft or more distinct instructions"
        )
    return {
        "method": spec.name,
        "tasks": tasks,
        "drift": merged_drift,
        "warnings": warnings,
        "rank": {"min": min(ranks, default=0), "max": max(ranks, default=0)},
        "shared_rows": {"count": len(targets.shared), "groups": targets.shared},
        **solve_info,
    }


def _sources(inputs: _Inputs, weights) -> list[dict]:
    return [
        {
            "task": a.task,
            "path": a.path,
            "method": a.method,
            "instructions": list(a.instructions),
            "fingerprint": (a.base or {}).get("fingerprint"),
            **({"weight": weights[i]} if weights else {}),
        }
        for i, a in enumerate(inputs.adapters)
    ]


def _build_adapter(inputs: _Inputs, base: Base, kv_deltas, kv_factors, other, as_lora, truncate_to, task) -> Adapter:
    """The merged adapter: full K/V (Custom Diffusion) or, with as_lora, LoRA factors (lsq: exact rank-m factors;
    the rest factored by SVD at their numerical rank, or at `truncate_to` for svd)."""
    names = sorted({a.task for a in inputs.adapters})
    common = {
        "task": task or "+".join(names),
        "instructions": sorted({t for a in inputs.adapters for t in a.instructions}),
        "base": {"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
    }
    if not as_lora:
        tensors = custom_diffusion.from_deltas(kv_deltas, inputs.base_weights)
        return Adapter(method=custom_diffusion.METHOD, tensors=tensors, **common)
    factors = dict(kv_factors or {})
    for name, delta in {**({} if kv_factors is not None else kv_deltas), **other}.items():
        factors[name] = baselines.factor(delta, truncate_to)
    tensors, config = lora.from_factors(factors)
    if not tensors:
        raise AdapterkitError("the merged update is zero on every module, so there is no LoRA to export; drop --as-lora")
    return Adapter(method=lora.METHOD, tensors=tensors, options=config, **common)


def fuse_into_pipeline(base: Base, adapter: Adapter, output: str) -> str:
    """Write `base` with `adapter` fused in as a full diffusers pipeline; the live base is restored afterwards."""
    unet = base.unet
    named = dict(unet.named_modules())
    touched = adapter.targets
    saved = {}
    for name in touched:
        saved[name] = unwrap_peft(named[name]).weight.detach().clone()
    try:
        adapter.module.fuse_into_base(unet, adapter.tensors, adapter.options)
        with atomic_folder(output) as tmp:
            base.pipe.save_pretrained(tmp)
            info = {**base.info, "resolution": base.resolution, "made_by": "adapterkit merge --fuse", "merged": adapter.merge.sources if adapter.merge else []}
            with open(os.path.join(tmp, BASE_INFO_FILE), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2, default=str)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                unwrap_peft(named[name]).weight.copy_(weight)
    return output
