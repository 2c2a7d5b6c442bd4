"""Least-squares merging: exactness, order independence, shared prefixes, rank deficiency, soft variant, LoRA export.

The tiny base's text features have 32 dimensions: tests keep instructions few and short so the constraint rows
(positions 1..first EOS of each instruction) stay well below 32.
"""

from __future__ import annotations

import os

import pytest
import torch

from adapterkit.adapters import Adapter, custom_diffusion
from adapterkit.base import cross_attention_kv_layers
from adapterkit.errors import AdapterkitError
from adapterkit.merge import features, lsq, merge
from adapterkit.testing import random_custom_diffusion, random_lora


pytestmark = pytest.mark.usefixtures("feature_cache")  # conftest.py: one cache outside the home


def kv_weight(adapter: Adapter, base, name: str) -> torch.Tensor:
    """Full float64 weight of one K/V layer for an adapter of either method."""
    w0 = cross_attention_kv_layers(base.unet)[name].weight.detach().double()
    delta = adapter.delta_weights({n: l.weight.detach() for n, l in cross_attention_kv_layers(base.unet).items()})
    return w0 + delta[name].double() if name in delta else w0


def target_rows(base, instructions) -> torch.Tensor:
    feats = features.instruction_features(base, instructions)
    return torch.cat([feats[t] for t in instructions])


def task_rows(base, adapters, base_kv, scales=None) -> list[lsq.TaskRows]:
    """Each adapter's constraint rows (positions 1..EOS) and its targets on them, times `scales` (per adapter)."""
    tasks = []
    for i, adapter in enumerate(adapters):
        ordered = sorted(set(adapter.instructions))
        feats = features.instruction_features(base, ordered)
        rows = torch.cat([feats[t] for t in ordered])
        deltas = adapter.delta_weights(base_kv, dtype=torch.float64)
        texts = [t for t in ordered for _ in range(feats[t].shape[0])]
        scale = 1.0 if scales is None else scales[i]
        tasks.append(lsq.TaskRows(adapter.task, texts, rows, {n: scale * d @ rows.T for n, d in deltas.items()}))
    return tasks


def grouped_rows(base, adapters, base_kv) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The merge's constraint rows (shared rows grouped), each K/V layer's targets R (d_out, m) and the task balance
    the merge chooses principal combinations with."""
    tasks = task_rows(base, adapters, base_kv)
    grouped = lsq.build_targets(tasks, "mean")
    layers = {n: w.shape[0] for n, w in base_kv.items()}
    return (grouped.rows, {n: lsq.layer_residual_targets(tasks, grouped, n, d) for n, d in layers.items()},
            lsq.task_balance(tasks, grouped, layers))


@pytest.mark.parametrize("make", ["custom-diffusion", "lora"])
def test_merging_one_adapter_reproduces_it_on_its_targets(tiny_base, make):
    source = (
        random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image", "remove rain"])
        if make == "custom-diffusion"
        else random_lora(tiny_base, "derain", rank=4, seed=1, instructions=["derain the image", "remove rain"])
    )
    result = merge([source], tiny_base, "lsq")
    rows = target_rows(tiny_base, source.instructions)
    for name, merged in result.adapter.tensors.items():
        want = kv_weight(source, tiny_base, name) @ rows.T
        got = merged.double() @ rows.T
        assert float((got - want).norm() / want.norm()) <= 1e-6, name
    assert result.report["tasks"][0]["residual"] <= 1e-6


def test_two_tasks_lsq_is_exact_where_linear_is_not_and_drifts_less_than_sum(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    b = random_custom_diffusion(tiny_base, "cartoonize", seed=2, instructions=["cartoonize the photo"])
    lsq_result = merge([a, b], tiny_base, "lsq")
    linear = merge([a, b], tiny_base, "linear")
    total = merge([a, b], tiny_base, "sum")
    for task in lsq_result.report["tasks"]:
        assert task["residual"] <= 1e-4
    for task in linear.report["tasks"]:
        assert 0.3 < task["residual"] < 1.0  # half of each task's change is missing, half of the other's added
    assert lsq_result.report["drift"] < total.report["drift"]
    assert lsq_result.report["rank"]["max"] == lsq_result.report["constraint_rows"]


def test_swapping_the_inputs_changes_no_weight(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image", "make it dry"])
    b = random_lora(tiny_base, "brighten", rank=4, seed=2, instructions=["make it brighter"])  # shares "make it"
    forward = merge([a, b], tiny_base, "lsq")
    backward = merge([b, a], tiny_base, "lsq")
    for name, weight in forward.adapter.tensors.items():
        assert float((weight - backward.adapter.tensors[name]).abs().max()) <= 1e-6, name
    assert forward.adapter.instructions == backward.adapter.instructions
    assert forward.adapter.task == backward.adapter.task == "brighten+derain"


def test_shared_prefix_rows_get_the_mean_target(tiny_base):
    """'make it' is the same causal prefix for both tasks: one row each, whose target is the mean of the tasks'."""
    a = random_custom_diffusion(tiny_base, "rainy", seed=1, instructions=["make it rain"])
    b = random_custom_diffusion(tiny_base, "snowy", seed=2, instructions=["make it snow"])
    result = merge([a, b], tiny_base, "lsq")
    shared = result.report["shared_rows"]
    assert shared["count"] == 2  # "make", "it"
    assert all(g["tasks"] == ["rainy", "snowy"] for g in shared["groups"])
    for task in result.report["tasks"]:
        assert task["shared_rows"] == 2
        assert task["residual"] <= 1e-4  # exact on the rows it owns alone ("rain"/"snow", EOS)
        assert task["residual_all_rows"] > 0.1  # the shared rows hold the mean, not this task's value
    prefix = features.instruction_features(tiny_base, ["make it rain"])["make it rain"][:2]  # (2, d): make, it
    for name, merged in result.adapter.tensors.items():
        mean_target = (kv_weight(a, tiny_base, name) + kv_weight(b, tiny_base, name)) / 2 @ prefix.T
        assert torch.allclose(merged.double() @ prefix.T, mean_target, rtol=1e-5, atol=1e-6)


def test_too_many_constraint_rows_are_refused_with_the_fix(tiny_base):
    long = [f"make the {w} picture look like a {v} painting of the sky" for w, v in [("dark", "bright"), ("old", "new"), ("gray", "white")]]
    a = random_custom_diffusion(tiny_base, "style", seed=1, instructions=long)
    b = random_custom_diffusion(tiny_base, "derain", seed=2, instructions=["derain the image"])
    with pytest.raises(AdapterkitError, match="smaller --max-rows, --method lsq-soft"):
        merge([a, b], tiny_base, "lsq", max_rows=10_000)  # every row, as the paper: more rows than text dims
    soft = merge([a, b], tiny_base, "lsq-soft", target_weight=100.0)
    linear = merge([a, b], tiny_base, "linear")
    for s, l in zip(soft.report["tasks"], linear.report["tasks"]):
        assert s["residual"] < l["residual"]


def test_rows_above_the_budget_are_solved_as_their_principal_combinations(tiny_base):
    long = [f"make the {w} picture look like a {v} painting of the sky" for w, v in [("dark", "bright"), ("old", "new"), ("gray", "white")]]
    a = random_custom_diffusion(tiny_base, "style", seed=1, instructions=long)
    b = random_custom_diffusion(tiny_base, "derain", seed=2, instructions=["derain the image"])
    result = merge([a, b], tiny_base, "lsq")  # the default budget: 3/8 of the text width
    report, d_text = result.report, result.report["d_text"]
    k = int(d_text * 3 / 8)
    assert report["constraint_rows"] > d_text and report["principal_rows"] == k
    assert 0.9 < report["principal_energy"] < 1.0
    assert f"solved as their top {k} principal combinations" in result.table
    # Exact on the kept combinations: with U_k the top k left singular vectors of the task-balanced rows and R the
    # rows' targets, the merged update dW satisfies dW C^T U_k = R U_k.
    base_kv = {n: layer.weight.detach().double() for n, layer in cross_attention_kv_layers(tiny_base.unet).items()}
    grouped, wanted, balance = grouped_rows(tiny_base, [a, b], base_kv)
    rows, rotation, _ = lsq.principal_rows(grouped, k, balance)
    merged = result.adapter.delta_weights(base_kv, dtype=torch.float64)
    for name in base_kv:
        got, want = merged[name] @ rows.T, wanted[name] @ rotation
        assert float((got - want).norm() / want.norm()) < 1e-4  # float32 file
    # Rows within the budget are solved as they are: the same update bit for bit whatever budget covers them.
    c = random_custom_diffusion(tiny_base, "cartoonize", seed=3, instructions=["cartoonize the photo"])
    small = merge([b, c], tiny_base, "lsq").adapter.tensors
    roomy = merge([b, c], tiny_base, "lsq", max_rows=d_text - 1).adapter.tensors
    assert all(torch.equal(small[n], roomy[n]) for n in small)
    with pytest.raises(AdapterkitError, match="--max-rows must be at least 1"):
        merge([b, c], tiny_base, "lsq", max_rows=0)
    with pytest.raises(AdapterkitError, match="--max-rows applies to exact least squares"):
        merge([b, c], tiny_base, "linear", max_rows=4)


def test_the_budget_balances_tasks_so_a_weak_adapter_keeps_its_rows(tiny_base):
    """Principal combinations chosen by the rows' energy alone favour no task; weighting each task's rows by
    1 / sqrt(its targets' energy) keeps a task whose adapter moves K/V 20x less than the other's (issue 12: denoise
    among the demo's four tasks) from losing its fit to the strong one."""
    long = [f"make the {w} picture look like a {v} painting of the sky" for w, v in [("dark", "bright"), ("old", "new")]]
    strong = random_custom_diffusion(tiny_base, "style", seed=1, instructions=long)
    weak = random_lora(tiny_base, "derain", seed=2, instructions=["derain the image", "remove the rain from the photo"])
    base_kv = {n: layer.weight.detach().double() for n, layer in cross_attention_kv_layers(tiny_base.unet).items()}
    layers = {n: w.shape[0] for n, w in base_kv.items()}
    tasks = task_rows(tiny_base, [strong, weak], base_kv, scales=[1.0, 0.05])
    grouped = lsq.build_targets(tasks, "mean")
    balance = lsq.task_balance(tasks, grouped, layers)
    assert float(balance[grouped.columns(1, own=True)].min()) > 3 * float(balance[grouped.columns(0, own=True)].max())
    gram = torch.eye(grouped.rows.shape[1], dtype=torch.float64)
    k = grouped.rows.shape[0] // 2

    def relative_residuals(weights):
        rows, rotation, _ = lsq.principal_rows(grouped.rows, k, weights)
        left, right, _ = lsq.exact_projection(gram, rows)
        out = []
        for i, task in enumerate(tasks):
            own = grouped.columns(i, own=True)
            err = want = 0.0
            for name, d_out in layers.items():
                r = lsq.layer_residual_targets(tasks, grouped, name, d_out)
                b, a = lsq.solve_layer(tasks, grouped, rotation @ left, right, name, d_out)
                err += float(((b @ a @ grouped.rows.T - r)[:, own] ** 2).sum())
                want += float((r[:, own] ** 2).sum())
            out.append((err / want) ** 0.5)
        return out

    plain, balanced = relative_residuals(None), relative_residuals(balance)
    assert balanced[1] < 0.5 * plain[1] and max(balanced) < max(plain), (plain, balanced)


def test_soft_merge_tends_to_the_exact_one(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    b = random_custom_diffusion(tiny_base, "cartoonize", seed=2, instructions=["cartoonize the photo"])
    exact = merge([a, b], tiny_base, "lsq").adapter.tensors
    gaps = []
    for weight in (1.0, 1e2, 1e6):
        soft = merge([a, b], tiny_base, "lsq-soft", target_weight=weight).adapter.tensors
        gaps.append(max(float((soft[n] - exact[n]).norm() / exact[n].norm()) for n in exact))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-4


def test_as_lora_export_is_the_same_update_at_rank_m(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    b = random_lora(tiny_base, "cartoonize", rank=2, seed=2, instructions=["cartoonize the photo"])
    full = merge([a, b], tiny_base, "lsq")
    low = merge([a, b], tiny_base, "lsq", as_lora=True)
    m = full.report["constraint_rows"]
    assert low.adapter.method == "lora" and low.adapter.rank == m
    assert low.adapter.options["lora_alpha"] == m  # scale 1
    base_weights = {n: l.weight.detach() for n, l in cross_attention_kv_layers(tiny_base.unet).items()}
    deltas = low.adapter.delta_weights()
    for name, weight in full.adapter.tensors.items():
        want = weight.double() - base_weights[name].double()
        assert float((deltas[name].double() - want).norm() / want.norm()) < 1e-5, name


def test_other_modules_need_as_lora_and_are_averaged(tiny_base):
    a = random_lora(tiny_base, "derain", rank=2, seed=1, targets="attn", instructions=["derain the image"])
    b = random_lora(tiny_base, "cartoonize", rank=2, seed=2, targets="attn", instructions=["cartoonize the photo"])
    with pytest.raises(AdapterkitError, match="--as-lora"):
        merge([a, b], tiny_base, "lsq")
    result = merge([a, b], tiny_base, "lsq", as_lora=True)
    assert result.report["other_modules"]["method"] == "linear" and result.report["other_modules"]["count"] > 0
    assert "least squares does not apply" in result.table
    merged, da, db = result.adapter.delta_weights(), a.delta_weights(), b.delta_weights()
    kv = set(cross_attention_kv_layers(tiny_base.unet))
    others = [m for m in da if m not in kv]
    for module in others:
        want = (da[module] + db[module]) / 2
        assert torch.allclose(merged[module], want, atol=1e-5 * float(want.abs().max()))
    assert result.report["tasks"][0]["residual"] <= 1e-4
    assert "rank_pattern" in result.adapter.options  # K/V at rank m, other modules at their own numerical rank


def test_inputs_from_another_base_are_refused(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1)
    b = random_custom_diffusion(tiny_base, "cartoonize", seed=2)
    b.base = {"name_or_path": "elsewhere", "fingerprint": "0123456789abcdef"}
    with pytest.raises(AdapterkitError, match="--force"):
        merge([a, b], tiny_base, "lsq")
    assert merge([a, b], tiny_base, "lsq", force=True).report["tasks"][1]["residual"] <= 1e-4


def test_lsq_needs_instructions(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1)
    b = random_custom_diffusion(tiny_base, "cartoonize", seed=2)
    b.instructions = []
    with pytest.raises(AdapterkitError, match="no instructions"):
        merge([a, b], tiny_base, "lsq")
    assert merge([a, b], tiny_base, "linear").report["tasks"][1]["residual"] is None


def test_features_are_cached_per_base(tiny_base, feature_cache, monkeypatch):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    first = merge([a], tiny_base, "lsq")
    folder = os.path.join(feature_cache, "features", tiny_base.fingerprint)
    assert any(f.startswith("regularization-") for f in os.listdir(folder))
    assert any(f.startswith("instructions-") for f in os.listdir(folder))
    calls = []
    real = features.encode_tokens
    monkeypatch.setattr(features, "encode_tokens", lambda pipe, texts, **kw: calls.append(list(texts)) or real(pipe, texts, **kw))
    second = merge([a], tiny_base, "lsq")
    assert all(len(texts) == 1 for texts in calls)  # only the text-encoder probe ran: no regularization re-encoding
    for name, weight in first.adapter.tensors.items():
        assert torch.equal(weight, second.adapter.tensors[name])


def test_cached_instruction_rows_follow_the_padding_direction_count(tiny_base, feature_cache, monkeypatch):
    """eos+padding rows keep PADDING_DIRECTIONS principal directions of each padding block: a cache entry written
    with another count must not be reused (it would give the merge rows of the wrong kind, silently)."""
    texts = ["derain the image", "make it a cartoon"]
    three = features.instruction_features(tiny_base, texts, "eos+padding")
    monkeypatch.setattr(features, "PADDING_DIRECTIONS", 1)
    one = features.instruction_features(tiny_base, texts, "eos+padding")
    eos = features.instruction_features(tiny_base, texts, "eos")
    for t in texts:
        assert one[t].shape[0] == eos[t].shape[0] + 1 and three[t].shape[0] > one[t].shape[0]
        assert torch.equal(one[t][:-1], eos[t]) and torch.allclose(one[t][-1], three[t][eos[t].shape[0]])


def test_regularization_prompts_file(tiny_base, tmp_path):
    builtin = features.read_prompts()
    assert len(builtin) >= 501 and "" in builtin
    path = tmp_path / "reg.txt"
    path.write_text("# mine\na photo of a dog\n\nmake it blue\n")
    assert features.read_prompts(str(path)) == ["", "a photo of a dog", "make it blue"]
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    result = merge([a], tiny_base, "lsq", reg_prompts=str(path))
    assert result.report["regularization"]["prompts"] == 3
    with pytest.raises(AdapterkitError, match="does not exist"):
        merge([a], tiny_base, "lsq", reg_prompts=str(tmp_path / "missing.txt"))


def test_custom_diffusion_output_covers_every_kv_layer(tiny_base):
    a = random_lora(tiny_base, "derain", rank=2, seed=1, instructions=["derain the image"])
    result = merge([a], tiny_base, "lsq")
    assert result.adapter.method == custom_diffusion.METHOD
    assert set(result.adapter.tensors) == set(cross_attention_kv_layers(tiny_base.unet))
