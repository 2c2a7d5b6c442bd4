"""`adapterkit demo` end to end on the bundled base, with tiny settings: every phase runs and writes its files
(the tuned figures themselves are the README's, from a full run)."""

from __future__ import annotations

import json
import os

import pytest

from adapterkit.demo.run import DEMO_TASKS, DemoSettings, format_summary, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_runs_every_phase_and_writes_its_report(tmp_path):
    out = str(tmp_path / "demo")
    summary = run_demo(out, DemoSettings(train_rows=8, eval_rows=1, train_steps=2), quiet=True)
    assert set(summary["tasks"]) == set(DEMO_TASKS)
    for task, row in summary["tasks"].items():
        assert row["method"] == DEMO_TASKS[task].method
        assert row["gain_db"] == pytest.approx(row["psnr_adapter"] - row["psnr_base"])
        assert {"psnr_lsq", "psnr_linear", "retention_lsq", "retention_linear"} <= set(row)
    for path in (summary["files"]["report_html"], summary["files"]["report_json"], *summary["files"]["grids"].values()):
        assert os.path.getsize(path) > 0
    assert json.load(open(os.path.join(out, "demo.json")))["tasks"] == json.loads(json.dumps(summary["tasks"]))
    for name in ("derain", "cartoonize"):
        assert os.path.isfile(os.path.join(out, "adapters", name, "adapter.json"))
    merged = json.load(open(os.path.join(out, "merges", "merged-lsq", "adapter.json")))
    assert merged["merge"]["method"] == "lsq-soft"
    bank = summary["bank"]
    assert set(bank["swap_ms"]) == {"derain", "cartoonize", "merged-lsq"} and all(ms > 0 for ms in bank["swap_ms"].values())
    routed = {r["instruction"]: r["task"] for r in bank["routing"]}
    assert routed["derain the image"] == "derain" and routed["cartoonize it"] == "cartoonize"  # stored phrasings
    table = format_summary(summary)
    assert table.splitlines()[0].split()[:5] == ["task", "method", "base", "adapter", "gain"] and "hot-swap" in table
