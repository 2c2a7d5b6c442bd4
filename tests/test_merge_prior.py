"""Least squares near the sources' average (`--prior average`, issue 12): the constraints as exact as the paper's
form, the documented problem solved (checked against its KKT system, written here), one adapter kept as it is, and
the option refused where it means nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from adapterkit.adapters import save_adapter
from adapterkit.base import cross_attention_kv_layers
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.merge import features, merge
from adapterkit.testing import random_custom_diffusion, random_lora

pytestmark = pytest.mark.usefixtures("feature_cache")  # conftest.py: one cache outside the home


def sources(base):
    a = random_custom_diffusion(base, "derain", seed=1, strength=0.3, instructions=["derain the image", "remove rain"])
    b = random_custom_diffusion(base, "cartoonize", seed=2, strength=0.3, instructions=["cartoonize the photo"])
    return a, b


def kkt_solution(w0, w_avg, gram, rows, values):
    """argmin_W tr((W - W_avg) M (W - W_avg)^T) s.t. C W^T = V, from the stationarity and constraint equations:
    [[M, C^T], [C, 0]] [W^T; Y] = [M W_avg^T; V]."""
    d, m = gram.shape[0], rows.shape[0]
    system = torch.zeros(d + m, d + m, dtype=torch.float64)
    system[:d, :d], system[:d, d:], system[d:, :d] = gram, rows.T, rows
    rhs = torch.cat([gram @ w_avg.T, values])
    return torch.linalg.solve(system, rhs)[:d].T - w0


def test_average_prior_solves_the_documented_problem(tiny_v1):
    a, b = sources(tiny_v1)
    result = merge([a, b], tiny_v1, "lsq", prior="average", ridge=0.0, quiet=True)
    gram, _ = features.regularization_gram(tiny_v1, features.read_prompts(), positions="all")
    rows = {t: features.instruction_features(tiny_v1, list(s.instructions))
            for t, s in (("derain", a), ("cartoonize", b))}
    own_rows = {t: torch.cat([r[i] for i in sorted(r)]) for t, r in rows.items()}
    stacked = torch.cat([own_rows["derain"], own_rows["cartoonize"]])
    w0 = {n: layer.weight.detach().double() for n, layer in cross_attention_kv_layers(tiny_v1.unet).items()}
    deltas = {"derain": a.delta_weights(w0, dtype=torch.float64), "cartoonize": b.delta_weights(w0, dtype=torch.float64)}
    assert result.report["prior"] == "average"
    for name, base_weight in w0.items():
        values = torch.cat([own_rows[t] @ (base_weight + deltas[t][name]).T for t in ("derain", "cartoonize")])
        w_avg = base_weight + (deltas["derain"][name] + deltas["cartoonize"][name]) / 2
        expected = kkt_solution(base_weight, w_avg, gram, stacked, values)
        error = (result.updates[name] - expected).norm() / expected.norm()
        assert error < 1e-6, (name, float(error))
    assert all(t["residual"] < 1e-4 for t in result.report["tasks"])  # measured on the written float32 file


def test_average_prior_keeps_a_single_adapter_as_it_is(tiny_v1):
    """The average of one adapter already meets its own constraints, so nothing is corrected (the paper's prior
    would pull it toward the base off its instructions' rows)."""
    a, _b = sources(tiny_v1)
    w0 = {n: layer.weight.detach().double() for n, layer in cross_attention_kv_layers(tiny_v1.unet).items()}
    own = a.delta_weights(w0, dtype=torch.float64)
    for method in ("lsq", "lsq-soft"):
        near_average = merge([a], tiny_v1, method, prior="average", quiet=True).updates
        near_base = merge([a], tiny_v1, method, quiet=True).updates
        for name in w0:
            assert (near_average[name] - own[name]).norm() <= 1e-8 * own[name].norm(), method
            assert (near_base[name] - own[name]).norm() > 0.1 * own[name].norm(), method


def test_average_prior_moves_the_regularization_prompts_more_than_the_papers(tiny_v1):
    """The report's drift says what the option costs: the base's behaviour on other text moves, by about as much as
    averaging moves it (here random full-rank sources: paper 0.27, average prior 0.33, linear 0.20)."""
    a, b = sources(tiny_v1)
    paper = merge([a, b], tiny_v1, "lsq", quiet=True).report["drift"]
    near_average = merge([a, b], tiny_v1, "lsq", prior="average", quiet=True)
    linear = merge([a, b], tiny_v1, "linear", quiet=True).report["drift"]
    assert paper < near_average.report["drift"]
    assert near_average.report["drift"] > 0.5 * linear
    assert "--prior average" in near_average.table


def test_prior_is_refused_for_the_baselines_and_unknown_values(tiny_v1):
    a, b = sources(tiny_v1)
    with pytest.raises(AdapterkitError, match="--prior applies to least squares"):
        merge([a, b], tiny_v1, "linear", prior="average", quiet=True)
    with pytest.raises(AdapterkitError, match="unknown --prior 'middle'"):
        merge([a, b], tiny_v1, "lsq", prior="middle", quiet=True)


def test_cli_prior_average_is_recorded_and_exports_as_lora(tiny_base_dir, tiny_base, tmp_path):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    b = random_lora(tiny_base, "cartoonize", rank=2, seed=2, instructions=["cartoonize the photo"])
    folders = [save_adapter(a, str(tmp_path / "derain")), save_adapter(b, str(tmp_path / "cartoonize"))]
    out = str(tmp_path / "merged")
    result = CliRunner().invoke(main, ["merge", *folders, "--base", tiny_base_dir, "--prior", "average", "--as-lora",
                                       "--output", out, "--quiet"])
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "adapter.json")) as f:
        meta = json.load(f)
    assert meta["merge"]["options"]["prior"] == "average" and meta["merge"]["report"]["prior"] == "average"
    assert all(t["residual"] <= 1e-4 for t in meta["merge"]["report"]["tasks"])
    refused = CliRunner().invoke(main, ["merge", *folders, "--base", tiny_base_dir, "--method", "sum", "--prior",
                                        "average", "--output", str(tmp_path / "x"), "--quiet"])
    assert refused.exit_code == 2 and "--prior applies to least squares" in refused.output
    assert not os.path.exists(tmp_path / "x")
