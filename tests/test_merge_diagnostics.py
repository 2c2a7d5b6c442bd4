"""Issue 15: merge diagnostics grounded in measured quantities, m near the text width, the written file's residual,
probe phrasings. Calibrated on builtin:tiny v1 (text width 32; in tests/data since v2 is bundled), as adapterkit.merge.diagnostics
documents.
"""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

from adapterkit.adapters import load_adapter, save_adapter
from adapterkit.base import cross_attention_kv_layers
from adapterkit.cli import main
from adapterkit.demo.tasks import TASKS
from adapterkit.errors import AdapterkitError
from adapterkit.merge import features, merge
from adapterkit.testing import instruction_custom_diffusion
from conftest import TINY_V1


pytestmark = pytest.mark.usefixtures("feature_cache")  # conftest.py: one cache outside the home




def pair(base, k_derain: int, k_other: int, other: str = "cartoonize"):
    """Training-like adapters (K/V moved along their own instructions' features) for demo tasks."""
    a = instruction_custom_diffusion(base, "derain", list(TASKS["derain"].instructions)[:k_derain], seed=1)
    b = instruction_custom_diffusion(base, other, list(TASKS[other].instructions)[:k_other], seed=2)
    return a, b


def test_issue15_1_warnings_fire_on_lost_tasks_and_not_on_kept_ones(tiny_v1):
    a, b = pair(tiny_v1, 1, 1)
    # Kept: soft over all 77 positions reproduces each task's prompts far better than averaging.
    kept = merge([a, b], tiny_v1, "lsq-soft", positions="all", quiet=True).report
    for t in kept["tasks"]:
        assert t["prompt_residual"] < 0.5 * t["prompt_residual_linear"]
    assert kept["warnings"] == []  # main warned here ("drifts more than any source ... try --method lsq-soft")
    # Lost: exact over EOS rows leaves the padding positions to the regularization; the UNet reads them.
    lost = merge([a, b], tiny_v1, "lsq", quiet=True).report
    assert all(t["prompt_residual"] > t["prompt_residual_linear"] for t in lost["tasks"])
    assert len([w for w in lost["warnings"] if "likely lost" in w]) == 2
    assert all("--positions all" in w for w in lost["warnings"] if "likely lost" in w)
    # A soft merge never tells the user to try the soft merge.
    assert not any("--method lsq-soft" in w for w in kept["warnings"] + merge([a, b], tiny_v1, "lsq-soft", quiet=True).report["warnings"])


@pytest.mark.parametrize("prompt, linear, warned", [
    (0.83, 0.58, False),  # builtin:tiny v2's derain in the demo's exact merge: kept 68% of its gain, averaging 38%
    (0.98, 1.14, False),  # better than averaging
    (1.00, 0.60, True),  # the base's own residual: nothing of the task kept, and averaging keeps some
    (4.45, 1.25, True),  # builtin:tiny v1's cartoonize in the exact EOS merge: kept -82%
    (1.20, 1.30, False),  # lost either way, but averaging would not save it
])
def test_likely_lost_needs_a_prompt_residual_of_at_least_the_bases_and_above_averagings(prompt, linear, warned):
    from adapterkit.merge.diagnostics import warnings
    from adapterkit.merge.methods import METHODS

    report = {"drift": 0.1, "positions": "eos", "tasks": [{"task": "derain", "prompt_residual": prompt,
                                                          "prompt_residual_linear": linear, "source_drift": 0.1}]}
    said = [w for w in warnings(report, METHODS["lsq"]) if "likely lost" in w]
    assert bool(said) == warned, said
    if warned:
        assert f"{prompt:.2f} of its change off (the base alone: 1.00)" in said[0] and "--positions all" in said[0]


def test_issue15_2_rows_equal_to_the_text_width_are_refused_naming_rows_and_fix(tiny_v1, tmp_path):
    a, b = pair(tiny_v1, 1, 3, other="lowlight")  # 4 + 28 = 32 rows of 32 (main: exit 0)
    folders = [save_adapter(x, str(tmp_path / x.task)) for x in (a, b)]
    every_row = ["--max-rows", "32"]  # as the paper: no row budget
    run = CliRunner().invoke(main, ["merge", *folders, "--base", TINY_V1, "--output", str(tmp_path / "m"), "--quiet", *every_row])
    assert run.exit_code == 2, run.output
    assert "32" in run.output and "derain 4" in run.output and "lowlight 28" in run.output and "--method lsq-soft" in run.output
    assert "smaller --max-rows" in run.output
    assert not os.path.exists(tmp_path / "m")
    # the default budget (3/8 of 32: 12 rows) solves the rows' top principal combinations instead, and says so
    run = CliRunner().invoke(main, ["merge", *folders, "--base", TINY_V1, "--output", str(tmp_path / "m"), "--quiet"])
    assert run.exit_code == 0, run.output
    assert "constraint rows 32 of 32 text dims, solved as their top 12 principal combinations" in run.output


def test_issue15_2_rows_near_the_text_width_warn(tiny_v1):
    a, b = pair(tiny_v1, 3, 3)  # 18 + 12 = 30 rows of 32
    report = merge([a, b], tiny_v1, "lsq", quiet=True, max_rows=32).report  # every row, as the paper
    assert report["constraint_rows"] == 30
    assert report["drift_ratio"] > 4.0
    assert any("30 constraint rows of 32" in w and "--method lsq-soft" in w for w in report["warnings"])
    small = merge(list(pair(tiny_v1, 1, 1)), tiny_v1, "lsq", quiet=True).report
    assert small["drift_ratio"] < 2.0 and not any("constraint rows of" in w for w in small["warnings"])


def test_issue15_6_residual_is_measured_on_the_written_float32_file(tiny_v1, tmp_path):
    a, b = pair(tiny_v1, 1, 1)
    result = merge([a, b], tiny_v1, "lsq", output=str(tmp_path / "m"), quiet=True)
    saved = load_adapter(str(tmp_path / "m"))
    layers = cross_attention_kv_layers(tiny_v1.unet)
    for task, source in zip(result.report["tasks"], (a, b)):
        rows = torch.cat(list(features.instruction_features(tiny_v1, source.instructions).values()))
        ratios = []
        for name, layer in layers.items():
            w0 = layer.weight.detach().double()
            want = (source.tensors[name].double() - w0) @ rows.T
            got = (saved.tensors[name].double() - w0) @ rows.T
            ratios.append(float((got - want).norm() / want.norm()))
        independent = sum(ratios) / len(ratios)
        assert independent > 1e-9  # float32 rounding is visible (the float64 solve's residual is ~1e-13)
        assert task["residual"] == pytest.approx(independent, rel=1e-3)


def test_probe_instructions_score_retention_and_refuse_stored_phrasings(tiny_v1, tmp_path):
    a, b = pair(tiny_v1, 1, 1)
    probes = tmp_path / "probes.txt"
    probes.write_text("# never stored\nderain: please remove the rain\ncartoonize: make it a cartoon drawing\n")
    report = merge([a, b], tiny_v1, "lsq-soft", positions="all", probe_instructions=str(probes), quiet=True).report
    rows = features.instruction_features(tiny_v1, ["please remove the rain"], "all")["please remove the rain"]
    layers = cross_attention_kv_layers(tiny_v1.unet)
    result = merge([a, b], tiny_v1, "lsq-soft", positions="all", quiet=True)
    ratios = []
    for name, layer in layers.items():
        own = (a.tensors[name].double() - layer.weight.detach().double()) @ rows.T
        ratios.append(float((result.updates[name] @ rows.T - own).norm() / own.norm()))
    derain = report["tasks"][[t["task"] for t in report["tasks"]].index("derain")]
    assert derain["probe"]["phrasings"] == 1
    assert derain["probe"]["retention"] == pytest.approx(1 - sum(ratios) / len(ratios), rel=1e-3, abs=1e-4)
    with pytest.raises(AdapterkitError, match="stored instructions"):
        merge([a, b], tiny_v1, "lsq", probe_instructions={"derain": [a.instructions[0]]}, quiet=True)
    with pytest.raises(AdapterkitError, match="not among the merged"):
        merge([a, b], tiny_v1, "lsq", probe_instructions={"dehaze": ["remove the haze"]}, quiet=True)
    bad = tmp_path / "bad.txt"
    bad.write_text("no colon here\n")
    run = CliRunner().invoke(main, ["merge", *[save_adapter(x, str(tmp_path / x.task)) for x in (a, b)], "--base",
                                    TINY_V1, "--output", str(tmp_path / "m"), "--probe-instructions", str(bad)])
    assert run.exit_code == 2 and "line 1" in run.output
