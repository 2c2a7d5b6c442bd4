"""The benchmarks that cannot run here at full size still run here small, so they never rot: bench/gpu.py --smoke
(tiny base, 2 steps, CPU, bf16 standing in for fp16) and bench/train_memory.py on the tiny base."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    done = _run(["bench/gpu.py", "--smoke", "--json", str(tmp_path / "gpu.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = result["train"]
    assert [(r["method"], r["optimizer"]) for r in rows] == [
        (m, "adamw8bit") for m in ("custom-diffusion", "lora", "full-finetune")] * 2 + [("full-finetune", "adamw")]
    for row in rows:
        assert "error" not in row, row
        assert row["precision"] == "bf16" and row["steps"] == 2 and row["s_per_step"] > 0 and math.isfinite(row["final_loss"])
    full = next(r for r in rows if r["method"] == "full-finetune")
    cd = next(r for r in rows if r["method"] == "custom-diffusion")
    assert cd["trainable_params_m"] < full["trainable_params_m"] and cd["steps_per_s_vs_full"] > 0
    assert {r["method"] for r in result["swap"]} == {"custom-diffusion", "lora"} and all(r["swap_ms"] > 0 for r in result["swap"])
    compiled = result["compile"]
    assert compiled["recompiles"] == 0 and compiled["swaps"] == 10 and compiled["edit_compiled_s"] > 0
    assert "skipped" in result["mixed_batch"] or result["mixed_batch"]["batch_images_per_s"] > 0
    cli = result["cli_edit"]  # `adapterkit edit` with the default device: the CPU here, in float32
    assert cli["exit_code"] == 0 and cli["device_line"] == "device: cpu, float32" and cli["max_diff_vs_bank"] <= 1, cli
    assert "recompiles" in done.stdout and "s_per_step" in done.stdout  # the tables


def test_gpu_suite_without_a_gpu_says_so(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = _run(["bench/gpu.py"], tmp_path)
    assert done.returncode == 2 and "no CUDA device: run on a GPU, or pass --smoke" in done.stderr


def test_train_memory_measures_a_real_train_process(tmp_path):
    done = _run(["bench/train_memory.py", "--size", "tiny", "--settings", "512-bf16-gc", "--methods", "lora", "--steps", "1",
                 "--json", str(tmp_path / "tm.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "tm.json").read_text())["results"]
    assert "error" not in row, row
    assert row["mixed_precision"] == "bf16" and row["gradient_checkpointing"] is True and len(row["step_s"]) == 1
    assert 0.2 < row["peak_rss_gb"] < 4  # the whole process (torch, diffusers, the tiny base): a real maxrss
