"""`adapterkit demo` end to end on the bundled base, with tiny settings: every phase runs and writes its files
(the tuned figures themselves are the README's, from a full run)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from adapterkit.demo.run import DEMO_TASKS, DemoSettings, format_summary, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_every_phase_and_writes_its_report(tmp_path):
    out = str(tmp_path / "demo")
    summary = run_demo(out, DemoSettings(train_rows=8, eval_rows=1, train_steps=2), quiet=True)
    assert set(summary["tasks"]) == set(DEMO_TASKS)
    for task, row in summary["tasks"].items():
        assert row["method"] == DEMO_TASKS[task]
        # The label comes from the adapter's own record: the base's recommended rank, the steps actually taken.
        assert row["adapter"] == {"lora": "LoRA r128 on K/V, 2 steps", "custom-diffusion": "Custom Diffusion, 2 steps"}[row["method"]]
        assert row["gain_db"] == pytest.approx(row["psnr_adapter"] - row["psnr_base"])
        assert {"psnr_lsq", "psnr_linear", "retention_lsq", "retention_linear"} <= set(row)
    for path in (summary["files"]["report_html"], summary["files"]["report_json"], *summary["files"]["grids"].values()):
        assert os.path.getsize(path) > 0
    assert json.load(open(os.path.join(out, "demo.json")))["tasks"] == json.loads(json.dumps(summary["tasks"]))
    for name in ("derain", "cartoonize"):
        assert os.path.isfile(os.path.join(out, "adapters", name, "adapter.json"))
    # The task measures (issue 12) score every column, recomputed here from the saved PNGs for the base's derain row.
    measures_ = summary["task_measures"]
    assert measures_["derain"]["measure"] == "rain_psnr" and measures_["cartoonize"]["measure"] == "outline_f1"
    for m in measures_.values():
        assert {"base", "merged-lsq", "merged-linear"} <= set(m["columns"])
    assert all(0.0 <= v <= 1.0 for v in measures_["cartoonize"]["columns"].values())
    from adapterkit.demo import measures
    from adapterkit.demo.tasks import rain_mask
    from adapterkit.inference import open_image

    folder = os.path.join(out, "images", summary_folder(out, "derain"))
    read = lambda column: np.asarray(open_image(os.path.join(folder, column, "0.png")))  # noqa: E731
    expected = measures.masked_psnr(read("base"), read("target"), rain_mask(0, 0, summary["base"]["resolution"]))
    assert measures_["derain"]["columns"]["base"] == pytest.approx(expected)
    merged = json.load(open(os.path.join(out, "merges", "merged-lsq", "adapter.json")))
    assert merged["merge"]["method"] == "lsq"  # adapterkit merge's default, exact on v2's 256-wide text features
    bank = summary["bank"]
    assert set(bank["swap_ms"]) == {"derain", "cartoonize", "merged-lsq"} and all(ms > 0 for ms in bank["swap_ms"].values())
    routed = {r["instruction"]: r["task"] for r in bank["routing"]}
    assert routed["derain the image"] == "derain" and routed["cartoonize it"] == "cartoonize"  # stored phrasings
    table = format_summary(summary)
    assert table.splitlines()[0].split()[:5] == ["task", "method", "base", "adapter", "gain"] and "hot-swap" in table
    # issue 19: the adapter as the README names it, a line for the merge step, "cache latents" explained
    assert "derain      LoRA r128 on K/V, 2 steps" in table and "cartoonize  Custom Diffusion, 2 steps" in table
    assert "merge: lsq = exact least squares over " in table and "; linear = plain average, drift on regularization prompts" in table
    assert "the 'cache latents' bar" in table
    html = open(summary["files"]["report_html"], encoding="utf-8").read()
    for task, row in summary["tasks"].items():  # report.html shows retention in the printout's form
        assert f" {_percent(row['retention_lsq'])} " in table and f"<td>{_percent(row['retention_lsq'])}</td>" in html


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _summary(**settings) -> dict:
    """A summary as run_demo returns it, with round figures."""
    row = {"psnr_base": 16.29, "psnr_adapter": 18.53, "gain_db": 2.24, "psnr_lsq": 18.78, "retention_lsq": 1.113,
           "psnr_linear": 17.55, "retention_linear": 0.5625}
    merge = {"method": "lsq", "constraint_rows": 56, "drift": 0.048, "time_s": {"total": 0.1}}
    return {
        "settings": {**DemoSettings().__dict__, **settings},
        "tasks": {"derain": {"method": "lora", "adapter": "LoRA r128 on K/V, 150 steps", **row},
                  "cartoonize": {"method": "custom-diffusion", "adapter": "Custom Diffusion, 150 steps", **row}},
        "task_measures": {},
        "merge": {"lsq": merge, "linear": {"method": "linear", "drift": 0.36, "time_s": {"total": 0.05}}},
        "bank": {"swap_ms": {"derain": 0.17}, "edit_ms": 416.0, "routing": []},
        "phase_seconds": {"data": 3, "train": 138}, "seconds": 175, "files": {"report_html": "adapterkit-demo/report.html"},
    }


def test_the_printout_says_what_the_readme_says_issue_19():
    from adapterkit.eval.report import format_retention

    table = format_summary(_summary())
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for label in ("LoRA r128 on K/V, 150 steps", "Custom Diffusion, 150 steps"):  # the README demo table's adapter column
        assert label in table and f"| {label} |" in readme
    assert " 111% " in table and format_retention(1.113) == "111%"  # one form: the eval table and report.html too
    assert "merge: lsq = exact least squares over 56 constraint rows, drift on regularization prompts 0.048, 0.10 s; " in table
    assert "encodes its 256 rows once (the 'cache latents' bar" in table and "cache latents" in readme
    weighted = _summary()
    weighted["merge"]["lsq"]["regularization"] = {"base_instructions": 80, "base_instructions_weight": 100.0}
    assert ("lsq = exact least squares over 56 constraint rows, drift on regularization prompts and the base's "
            "instructions x100 0.048" in format_summary(weighted))


def test_demo_merge_prior_reaches_the_lsq_merge_and_the_printout(monkeypatch, tmp_path):
    """`adapterkit demo --merge-prior average`: the lsq merge (not the linear one) gets prior="average", and the
    printout says which merge it shows."""
    import importlib

    from adapterkit.demo.run import _merge_adapters

    merge_package = importlib.import_module("adapterkit.merge")  # `adapterkit.merge` the attribute is the function

    calls = []

    class Result:
        adapter, report = object(), {}

    def fake_merge(sources, base, **options):
        calls.append(options)
        return Result()

    monkeypatch.setattr(merge_package, "merge", fake_merge, raising=False)
    _merge_adapters(str(tmp_path), None, {"derain": object()}, DemoSettings(merge_prior="average"), quiet=True)
    assert [c.get("prior") for c in calls] == ["average", None] and calls[1]["method"] == "linear"
    summary = _summary(merge_prior="average")
    summary["merge"]["lsq"]["prior"] = "average"
    table = format_summary(summary)
    assert "token positions, near the sources' average off the constraints)" in table
    assert "merge: lsq = exact least squares near the sources' average over 56 constraint rows" in table
    assert "--merge-prior average keeps more" not in table and "--merge-prior average keeps more" in format_summary(_summary())


def test_readme_demo_synopsis_lists_every_demo_option_and_the_output_is_ignored_issue_19():
    from adapterkit.cli import main

    demo = main.commands["demo"]
    options = [p.opts[0] for p in demo.params if p.opts[0].startswith("--")]
    assert options == ["--output", "--base", "--train-steps", "--merge-prior", "--quiet"]
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    synopsis = next(line for line in readme.splitlines() if line.startswith("`adapterkit demo ["))
    assert all(option in synopsis for option in options), synopsis
    default = next(p.default for p in demo.params if p.name == "output")
    ignored = open(os.path.join(ROOT, ".gitignore"), encoding="utf-8").read().split()
    assert f"/{default}/" in ignored  # running the quick start in the checkout leaves git status clean


def summary_folder(out, task):
    """The images/ folder name eval gave `task` (report.json records it)."""
    return json.load(open(os.path.join(out, "report.json")))["tasks"][task]["folder"]


def test_demo_writes_only_into_a_new_empty_or_earlier_demo_folder(tmp_path, tiny_base):
    """Session 22: the demo trains its adapters with overwrite, so `demo --output .` in a project would have replaced
    the project's own adapters/derain. A folder holding anything but an earlier demo (its demo.json) is refused
    before the base loads, nothing touched; an empty one and an earlier demo's are claimed (demo.json first)."""
    from adapterkit.adapters import load_adapter, save_adapter
    from adapterkit.demo.run import _claim_output
    from adapterkit.errors import AdapterkitError
    from adapterkit.testing import random_lora

    project = tmp_path / "project"
    save_adapter(random_lora(tiny_base, "derain", seed=5), str(project / "adapters" / "derain"))
    before = open(project / "adapters" / "derain" / "pytorch_lora_weights.safetensors", "rb").read()
    with pytest.raises(AdapterkitError, match=r"project holds files that are not an adapterkit demo's \(adapters\); .*"
                                              r"choose another --output"):
        run_demo(str(project), DemoSettings(train_rows=8, eval_rows=1, train_steps=2), quiet=True)
    assert sorted(os.listdir(project)) == ["adapters"] and load_adapter(str(project / "adapters" / "derain")).task == "derain"
    assert open(project / "adapters" / "derain" / "pytorch_lora_weights.safetensors", "rb").read() == before
    for folder in (tmp_path / "new", tmp_path / "empty", tmp_path / "earlier"):
        if folder.name == "empty":
            folder.mkdir()
        if folder.name == "earlier":
            (folder / "adapters").mkdir(parents=True)
            (folder / "demo.json").write_text("{}")
        _claim_output(str(folder), DemoSettings())
        assert json.load(open(folder / "demo.json"))["status"] == "running"
