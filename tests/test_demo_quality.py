"""End-to-end quality on the bundled base (issue 6): a short training run on `builtin:tiny` improves a held-out
task's PSNR on photographs the training never saw."""

from __future__ import annotations

import os

import pytest

from adapterkit.base import load_base
from adapterkit.demo.tasks import write_task_dataset
from adapterkit.eval import evaluate
from adapterkit.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_lora_training_on_builtin_tiny_improves_heldout_cartoonize(tmp_path, capsys):
    task = "cartoonize"  # held out from the base's build: the base alone scores below the unedited input
    data = write_task_dataset(task, str(tmp_path / "train"), n=64, split="train", quiet=True)
    held_out = write_task_dataset(task, str(tmp_path / "eval"), n=6, split="eval", quiet=True)
    adapter = train(TrainConfig(
        base="builtin:tiny", data=data, method="lora", task=task, output=str(tmp_path / "adapter"), steps=150,
        batch_size=8, learning_rate=3e-3, rank=8, optimizer="adamw", cache_latents=True, validation_steps=0,
        checkpoint_steps=0, log_with="none", quiet=True,
    ))
    assert adapter.training["steps_done"] == 150
    # quiet=True prints nothing: the base's recommendations (here lr_scheduler and K/V preservation) are in
    # adapter.json, not on stdout, which benches keep for their JSON.
    assert adapter.training["recommended_by_base"] == {"lr_scheduler": "cosine", "kv_preservation": 0.3}
    assert "settings recommended" not in capsys.readouterr().out
    base = load_base("builtin:tiny")
    result = evaluate(base, held_out, [adapter.path], str(tmp_path / "eval-out"), quiet=True,
                      guidance=base.info["default_guidance"], image_guidance=base.info["default_image_guidance"])
    psnr = {column: stats["psnr"]["mean"] for column, stats in result.report["tasks"][task]["metrics"].items()}
    gain = psnr["adapter"] - psnr["base"]
    print(f"cartoonize: base {psnr['base']:.2f} dB, adapter {psnr['adapter']:.2f} dB")
    assert gain >= 1.0, f"adapter {psnr['adapter']:.2f} dB vs base {psnr['base']:.2f} dB"
    assert os.path.isfile(result.files["grids"][task])
