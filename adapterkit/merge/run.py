"""How adapters are combined: `merge(adapters, base, method, ...)` -> one adapter (and optionally a fused pipeline).

Every input, Custom Diffusion or LoRA, becomes full weights W_i = W0 + dW_i on each attn2 K/V layer (a LoRA gives
dW = scale * B A). Methods:
- "lsq" / "lsq-soft": constrained least squares on K/V (lsq.py) with the tasks' instructions as targets and
  regularization prompts keeping the base elsewhere (features.py), or with prior="average" the sources' average.
  LoRA modules outside attn2 K/V (trained with `--targets attn`) are not text-fed, so least squares does not apply: they are merged with `other_modules`
  ("linear" by default, or "sum") and the report says so.
- "sum", "linear", "ties", "dare", "svd": exact baselines on full deltas of every module (baselines.py).

The result is a Custom Diffusion adapter (full K/V) or, with `as_lora`, a LoRA: the lsq update exactly as rank-m
factors, other updates factored by SVD at their numerical rank (`rank` for svd). Its adapter.json holds the union of
the sources' instructions (so a bank routes every task to it) and {"merge": {"method", "sources", "options", "report"}}.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch

# Merge outputs are one of two adapter formats, named here on purpose: full K/V (Custom Diffusion) or, with
# --as-lora, a LoRA. Inputs of any method go through the method protocol (Adapter.delta_weights).
from ..adapters import custom_diffusion, lora, tokens
from ..adapters.record import Adapter, MergeRecord, check_replaceable, load_adapter, save_adapter
from ..base import Base, cross_attention_kv_layers, load_base
from ..errors import AdapterkitError
from ..fileio import atomic_folder
from . import baselines, diagnostics, features, incremental, lsq, report as reporting
from .fuse import check_fused_output, fuse_into_pipeline
from .methods import MergeOptions, check_options, resolve_defaults


@dataclass
class MergeResult:
    adapter: Adapter  # the merged adapter (saved to `path` when an output was given)
    report: dict
    path: str | None = None
    pipeline_path: str | None = None
    updates: dict | None = None  # K/V layer -> W - W0 (d_out, d_text) float64, as solved (before the float32 file)

    @property
    def table(self) -> str:
        return reporting.format_table(self.report)


@dataclass
class _Inputs:
    adapters: list[Adapter]
    base_weights: dict[str, torch.Tensor]  # K/V layer -> W0 (d_out, d_text) float64
    kv: list[dict[str, torch.Tensor]]  # per adapter: K/V layer -> dW_i float64 (layers it changes)
    other: list[dict[str, torch.Tensor]]  # per adapter: other module -> dW_i float64 (LoRA --targets attn)
    tasks: list[lsq.TaskRows] = dataclasses.field(default_factory=list)  # per task (a merged input may give several)
    origin: list[int] = dataclasses.field(default_factory=list)  # per task: index of the input it comes from
    stored_drift: list = dataclasses.field(default_factory=list)  # per task: source drift stored by an earlier merge


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
    ridge: float | None = None,
    base_instructions_weight: float | None = None,
    reg_prompts: str | list[str] | None = None,
    positions: str = "auto",
    reg_positions: str = "all",
    shared_rows: str = "mean",
    probe_instructions: str | dict | None = None,
    other_modules: str = "linear",
    prior: str = "base",
    max_rows: int | None = None,
    as_lora: bool = False,
    task: str | None = None,
    output_pipeline: str | None = None,
    force: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
) -> MergeResult:
    """Merge adapters (folders or Adapter objects) made on `base` (a Base or a name for load_base); the options are
    MergeOptions' (methods.py), plus reg_prompts (a file or a list; built-in set when None; "" always added),
    probe_instructions ({task: [text]} or a file, diagnostics.py) and output_pipeline (the base with the merge fused
    in). A merged lsq adapter among the inputs contributes the tasks it stored (incremental.py). Defaults that depend
    on the base or the sources (ridge, base_instructions_weight, positions "auto") come from methods.resolve_defaults."""
    start = time.perf_counter()
    options = MergeOptions(weights=weights, density=density, seed=seed, rank=rank, target_weight=target_weight, ridge=ridge,
                           base_instructions_weight=base_instructions_weight, positions=positions, reg_positions=reg_positions,
                           shared_rows=shared_rows, other_modules=other_modules, prior=prior, max_rows=max_rows, as_lora=as_lora)
    spec = check_options(method, options, count=len(adapters) or None)  # every option checked before any work
    probes = diagnostics.read_probes(probe_instructions)
    base = base if isinstance(base, Base) else load_base(base)
    inputs = _prepare_inputs(adapters, base, force, as_lora)
    _check_output(output, output_pipeline, inputs, base, task, as_lora, overwrite)
    options = resolve_defaults(options, spec, len(base.instructions), inputs.adapters, base.name_or_path)
    timings, features_start = {"load": time.perf_counter() - start}, time.perf_counter()
    prompts, gram, reg_info, targets = _text_features(base, inputs, reg_prompts, options, spec.family == "lsq", quiet)
    timings["features"], solve_start = time.perf_counter() - features_start, time.perf_counter()
    kv_deltas, kv_factors, other, solve_info = _solve(spec, options, inputs, targets, gram)
    timings["solve"] = time.perf_counter() - solve_start
    merged_adapter = _build_adapter(inputs, base, kv_deltas, kv_factors, other, as_lora, rank if "rank" in spec.reads else None, task)
    report_start = time.perf_counter()
    features_info = {"prompts": prompts, "gram": gram, "reg": reg_info, "reg_prompts": reg_prompts, "probes": probes}
    merge_report = _full_report(spec, options, inputs, targets, base, merged_adapter, kv_factors or kv_deltas, other,
                                solve_info, features_info)
    timings["report"] = time.perf_counter() - report_start
    merge_report["time_s"] = {**timings, "total": time.perf_counter() - start}
    record = MergeRecord(method=method, sources=_sources(inputs, weights), options=dataclasses.asdict(options), report=merge_report)
    merged_adapter.extra = {"merge": record.to_dict()}
    packed = _constraints(spec, inputs, merge_report, base, options.positions, merged_adapter)
    result = MergeResult(adapter=merged_adapter, report=merge_report, updates=kv_deltas)
    return _write(result, base, output, output_pipeline, packed)


def _write(result: MergeResult, base: Base, output: str | None, output_pipeline: str | None, packed) -> MergeResult:
    """Save the merged adapter (with an lsq merge's constraints) and the fused pipeline where asked."""
    if output:
        result.path = _save(result.adapter, output, packed)
    if output_pipeline:
        result.pipeline_path = fuse_into_pipeline(base, result.adapter, output_pipeline, overwrite=True)  # checked first
    return result


def _full_report(spec, options: MergeOptions, inputs: _Inputs, targets, base, merged_adapter, solved, other, solve_info, info) -> dict:
    """The report, every figure measured on the written file, then the diagnostics (diagnostics.py)."""
    written = merged_adapter.delta_weights(inputs.base_weights, dtype=torch.float64)  # what users load (float32 file)
    merge_report = _build_report(spec, inputs, targets, written, solved, info["gram"], solve_info)
    reg_prompts = info["reg_prompts"]
    merge_report.update(
        positions=options.positions if spec.family == "lsq" else None,
        regularization={"prompts": len(info["prompts"]), **info["reg"], "positions": options.reg_positions,
                        "source": reg_prompts if isinstance(reg_prompts, str) else ("list" if reg_prompts else "builtin")},
        other_modules={"count": len(other), "method": options.other_modules if spec.family == "lsq" else spec.name} if other else None,
    )
    if merge_report.get("target_weight") is not None:  # lam' of the unnormalised form (lsq.py): lam * n / sum_g w_g
        merge_report["target_weight_unnormalised"] = options.target_weight * info["reg"]["effective_rows"] / float(targets.weights.sum())
    if spec.family == "lsq":
        diagnostics.score_prompts(merge_report, base, inputs.tasks, inputs.kv, written)
    diagnostics.score_probes(merge_report, base, inputs.tasks, written, info["probes"], options.positions)
    merge_report["warnings"] = diagnostics.warnings(merge_report, spec)
    return merge_report


def _save(adapter: Adapter, output: str, packed) -> str:
    """save_adapter, plus the stored constraints of an lsq merge, in one atomic folder swap."""
    if packed is None:
        return save_adapter(adapter, output)
    with atomic_folder(output) as tmp:
        save_adapter(adapter, tmp)
        incremental.write(tmp, packed)
    adapter.path = output
    return output


def _constraints(spec, inputs: _Inputs, merge_report: dict, base: Base, positions: str, merged_adapter: Adapter):
    """What a later merge needs of an lsq merge (incremental.py), kept with the in-memory adapter too."""
    if spec.family != "lsq":
        return None
    drifts = [t["source_drift"] for t in merge_report["tasks"]]
    packed = incremental.pack(inputs.tasks, positions, features.text_encoder_probe(base.pipe), drifts)
    incremental.attach(merged_adapter, packed)
    return packed


def _prepare_inputs(adapters: list, base: Base, force: bool, as_lora: bool) -> _Inputs:
    """Load folders, refuse other bases, and turn every adapter into float64 deltas on K/V and other modules."""
    if not adapters:
        raise AdapterkitError("nothing to merge; pass one or more adapter folders")
    first: dict[str, object] = {}  # real path -> the folder as first given
    for a in adapters:
        if isinstance(a, (str, os.PathLike)):
            real = os.path.realpath(a)
            if real in first:  # the merge ran, counting that adapter's rows twice, and stored its task twice
                raise AdapterkitError(f"{first[real]} is given twice; pass each adapter folder once")
            first[real] = a
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


def _text_features(base: Base, inputs: _Inputs, reg_prompts, options: MergeOptions, expand: bool, quiet: bool):
    """(regularization prompts, their Gram matrix, its rows (and the base's instructions weighted in: least squares),
    the tasks' target rows) (features.py, lsq.py).

    Fills inputs.tasks: one task per adapter, or, with `expand` (least squares), the tasks a merged adapter stored.
    """
    prompts = features.read_prompts(reg_prompts) if not isinstance(reg_prompts, list) else sorted(set(reg_prompts) | {""})
    gram, reg_rows = features.regularization_gram(base, prompts, quiet=quiet, positions=options.reg_positions)
    weight = options.base_instructions_weight or 0.0  # resolved for least squares; None for the baselines
    gram, effective = features.with_base_instructions(base, gram, reg_rows, weight, quiet, options.reg_positions)
    reg_info = {"rows": reg_rows, "effective_rows": effective,
                "base_instructions": len(base.instructions) if weight else 0, "base_instructions_weight": weight}
    probe = features.text_encoder_probe(base.pipe)
    stored = [incremental.expand(a, options.positions, probe) if expand else None for a in inputs.adapters]
    texts = [t for a, s in zip(inputs.adapters, stored) if s is None for t in a.instructions]
    with tokens.applied(base.pipe, tokens.union(inputs.adapters)):  # instructions may hold the sources' modifier tokens
        text_features = features.instruction_features(base, texts, options.positions, quiet=quiet)
    for index, (adapter, kv, found) in enumerate(zip(inputs.adapters, inputs.kv, stored)):
        if found is not None:
            inputs.tasks += found[0]
            inputs.stored_drift += found[1]
            inputs.origin += [index] * len(found[0])
            continue
        ordered = sorted(set(adapter.instructions))
        rows = [text_features[t] for t in ordered]
        stacked = torch.cat(rows) if rows else torch.zeros(0, gram.shape[0], dtype=torch.float64)
        row_texts = [t for t, r in zip(ordered, rows) for _ in range(r.shape[0])]
        targets = {name: delta @ stacked.T for name, delta in kv.items()}  # (d_out, k) = dW_i C_i^T
        inputs.tasks.append(lsq.TaskRows(adapter.task, row_texts, stacked, targets, deltas=kv))
        inputs.stored_drift.append(None)
        inputs.origin.append(index)
    return prompts, gram, reg_info, lsq.build_targets(inputs.tasks, options.shared_rows)


def _solve(spec, options: MergeOptions, inputs: _Inputs, targets: lsq.Targets, gram):
    """(K/V deltas, K/V factors or None, other modules' deltas, solve info) of the merge `spec` with `options`."""
    if spec.family == "lsq":
        updates, solve_info = _solve_lsq(spec.exact, inputs, targets, gram, options)
        if options.prior == "base":  # rank-m factors (B, A), which --as-lora writes exactly
            kv_factors, kv_deltas = updates, {name: b @ a for name, (b, a) in updates.items()}
        else:  # dense updates (lsq.solve_layer_near); --as-lora factors them by SVD
            kv_factors, kv_deltas = None, updates
        other = baselines.combine(options.other_modules, inputs.other) if any(inputs.other) else {}
        return kv_deltas, kv_factors, other, solve_info
    all_deltas = [{**kv, **other} for kv, other in zip(inputs.kv, inputs.other)]
    merged = baselines.combine(spec.name, all_deltas, options.weights, options.density, options.seed, options.rank)
    kv_deltas = {k: v for k, v in merged.items() if k in inputs.base_weights}
    other = {k: v for k, v in merged.items() if k not in inputs.base_weights}
    return kv_deltas, None, other, {}


def _solve_lsq(exact: bool, inputs: _Inputs, targets: lsq.Targets, gram, options: MergeOptions):
    """Shared factors once, then per layer B = R L and A: {layer: (B (d_out, k), A (k, d_text))}, k the constraint
    rows (or their principal combinations above the row budget); with prior "average", {layer: dense update
    (d_out, d_text)} near the inputs' average K/V delta (lsq.py)."""
    ridge, prior = options.ridge, options.prior
    missing = [t.task for t in inputs.tasks if t.rows.shape[0] == 0]
    if missing:
        raise AdapterkitError(
            f"adapter(s) {', '.join(missing)} store no instructions, which least squares needs as targets; adopt the "
            "folder with `adapterkit import DIR --task NAME --instruction TEXT ...`, pass it as "
            "'DIR::task=NAME::instruction=TEXT', or use a baseline method (--method linear)"
        )
    m, d_text = (int(x) for x in targets.rows.shape)
    info = {"constraint_rows": m, "d_text": d_text}
    if exact:
        brought = ", ".join(f"{t.task} {t.rows.shape[0]} from {len(set(t.texts))} instruction{'s' * (len(set(t.texts)) != 1)}"
                            for t in inputs.tasks)
        budget = lsq.row_budget(d_text, options.max_rows)
        balance = None if m <= budget else lsq.task_balance(
            inputs.tasks, targets, {name: w0.shape[0] for name, w0 in inputs.base_weights.items()})
        rows, rotation, energy = lsq.principal_rows(targets.rows, budget, balance)
        left, right, condition = lsq.exact_projection(gram, rows, ridge, brought)
        if rotation is not None:  # B = R U_k L': the solve on the rows' top principal combinations
            left = rotation @ left
            info["principal_rows"], info["principal_energy"] = int(rows.shape[0]), energy
        info["condition_number"] = condition
    else:
        left, right = lsq.soft_projection(gram, targets.rows, targets.weights, options.target_weight, ridge)
        info["target_weight"] = options.target_weight
        info["condition_number"] = None
    info["prior"], info["ridge"] = prior, ridge
    # The prior update: --method linear's own average of the inputs' K/V deltas (a merged input counts once).
    average = baselines.combine("linear", inputs.kv) if prior == "average" else None
    updates = {}
    for name, w0 in inputs.base_weights.items():
        if average is not None:
            near = average.get(name, torch.zeros_like(w0))  # a layer no input changes: the base's
            updates[name] = lsq.solve_layer_near(near, inputs.tasks, targets, left, right, name, w0.shape[0])
        else:
            updates[name] = lsq.solve_layer(inputs.tasks, targets, left, right, name, w0.shape[0])
    return updates, info


def _build_report(spec, inputs: _Inputs, targets: lsq.Targets, written, solved, gram, solve_info) -> dict:
    """Per task: rows, residual on the written (float32) file, source drift; overall: drift, rank, shared rows."""
    base_energy = reporting.energies(inputs.base_weights, gram)  # ||W0 C_reg^T||^2 per layer, shared by every drift
    tasks = []
    for i, (task, stored) in enumerate(zip(inputs.tasks, inputs.stored_drift)):
        own, mine = targets.columns(i, own=True), targets.columns(i, own=False)
        values = reporting.task_values(task, targets, i)
        tasks.append({
            "task": task.task,
            "source": inputs.adapters[inputs.origin[i]].path,
            "instructions": len(set(task.texts)),
            "target_rows": len(mine),
            "shared_rows": len(mine) - len(own),
            # On the rows the task owns alone (what exact lsq reproduces), and on all its rows, shared ones included.
            "residual": reporting.task_residual(written, values, targets.rows, own),
            "residual_all_rows": reporting.task_residual(written, values, targets.rows, mine) if len(own) < len(mine) else None,
            "source_drift": reporting.drift(task.deltas, base_energy, gram) if task.deltas is not None else stored,
        })
    if isinstance(next(iter(solved.values()), None), tuple):
        ranks = [reporting.factored_rank(b, a) for b, a in solved.values()]
    else:
        ranks = [reporting.dense_rank(d) for d in solved.values()]
    return {
        "method": spec.name,
        "tasks": tasks,
        "drift": reporting.drift(solved, base_energy, gram),
        "rank": {"min": min(ranks, default=0), "max": max(ranks, default=0)},
        "shared_rows": {"count": len(targets.shared), "groups": targets.shared},
        **solve_info,
    }


def _sources(inputs: _Inputs, weights) -> list[dict]:
    """Per task: where it came from. A task a merged adapter stored keeps its own name and instructions."""
    sources = []
    for task, index in zip(inputs.tasks, inputs.origin):
        a = inputs.adapters[index]
        stored = task.deltas is None
        sources.append({
            "task": task.task,
            "path": a.path,
            "method": "stored-by-merge" if stored else a.method,
            "instructions": sorted(set(task.texts)) if stored else list(a.instructions),
            "fingerprint": (a.base or {}).get("fingerprint"),
            **({"weight": weights[index]} if weights else {}),
        })
    return sources


def _merged_task(inputs: _Inputs, task: str | None) -> str:
    """The merged adapter's task name: `task`, else the sources' names joined by '+'."""
    return task or "+".join(sorted({a.task for a in inputs.adapters}))


def _check_output(output, output_pipeline, inputs: _Inputs, base: Base, task, as_lora: bool, overwrite: bool) -> None:
    """Before the features and the solve: an OUTPUT holding an adapter of another task or method (one of the sources,
    say) is refused unless `overwrite` (record.check_replaceable); a rerun of the same merge replaces its own. The
    same for output_pipeline: not the base itself, nor a folder holding something other than an earlier fused pipeline."""
    if output:
        check_replaceable(output, _merged_task(inputs, task), lora.METHOD if as_lora else custom_diffusion.METHOD, overwrite)
    if output_pipeline:
        check_fused_output(output_pipeline, base, overwrite)


def _build_adapter(inputs: _Inputs, base: Base, kv_deltas, kv_factors, other, as_lora, truncate_to, task) -> Adapter:
    """The merged adapter: full K/V (Custom Diffusion) or, with as_lora, LoRA factors (lsq: exact rank-m factors;
    the rest factored by SVD at their numerical rank, or at `truncate_to` for svd)."""
    common = {
        "task": _merged_task(inputs, task),
        "instructions": sorted({t for a in inputs.adapters for t in a.instructions}),
        "base": {"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
        "tokens": tokens.union(inputs.adapters),  # the merge owns every source's modifier tokens
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
