"""AdapterBank.edit_batch: mixed tasks in one pipeline call equal each image edited alone (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterkit.testing import random_custom_diffusion, random_image, random_lora

from adapterkit.adapters.bank import AdapterBank
from adapterkit.errors import AdapterkitError

OPTS = dict(steps=2, output_type="np")
TASKS = ["cd_a", "lora_a", None, "cd_b", "lora_b", "cd_a", "lora_b", None]  # 4 adapters, both methods, the base


def make_bank(base, **kwargs):
    bank = AdapterBank(base, **kwargs)
    bank.add(random_custom_diffusion(base, "cd_a", seed=1, instructions=["derain the image"]))
    bank.add(random_custom_diffusion(base, "cd_b", seed=2, instructions=["cartoonize the image"]))
    bank.add(random_lora(base, "lora_a", rank=2, alpha=4.0, seed=3, instructions=["make it snowy"]))
    bank.add(random_lora(base, "lora_b", rank=6, seed=4, instructions=["add fog to the image"]))
    return bank


def batch_inputs(n, offset=0):
    return [random_image(i + offset) for i in range(n)], [f"edit number {i}" for i in range(n)], [100 + i + offset for i in range(n)]


def singles(bank, images, instructions, tasks, seeds):
    return [bank.edit(img, text, task=task, seed=seed, **OPTS) for img, text, task, seed in zip(images, instructions, tasks, seeds)]


def max_diff(outputs, expected):
    return max(float(np.abs(o - e).max()) for o, e in zip(outputs, expected))


def test_mixed_batch_equals_each_image_edited_alone(tiny_base, one_thread):
    bank = make_bank(tiny_base)
    images, instructions, seeds = batch_inputs(len(TASKS))
    outputs = bank.edit_batch(images, instructions, TASKS, seeds, **OPTS)
    expected = singles(bank, images, instructions, TASKS, seeds)
    assert len(outputs) == len(TASKS)
    assert max_diff(outputs, expected) <= 1 / 255  # measured ~4e-6
    base_outputs = singles(bank, images, instructions, [None] * len(TASKS), seeds)
    for i, task in enumerate(TASKS):  # each image really got its own adapter
        assert (np.abs(outputs[i] - base_outputs[i]).max() > 1e-3) == (task is not None), (i, task)
    # per-image seeds: the same image and task with another seed differs
    assert np.abs(bank.edit_batch(images[:1], instructions[:1], TASKS[:1], [7], **OPTS)[0] - outputs[0]).max() > 1e-3


def test_stop_ends_the_call_between_steps_and_the_bank_edits_as_before_after_it(tiny_base, one_thread):
    """`stop` (what serve passes: every request of the batch abandoned) is checked after each denoising step; once
    true the call raises Stopped there, and the next call's outputs are unchanged (mixed and single-task paths)."""
    from adapterkit.adapters.batch_edit import Stopped

    bank = make_bank(tiny_base)
    images, instructions, seeds = batch_inputs(3)
    expected = bank.edit_batch(images, instructions, TASKS[:3], seeds, **OPTS)
    for tasks in (TASKS[:3], ["lora_a"] * 3):
        checks = []
        with pytest.raises(Stopped, match="stopped after step 1"):
            bank.edit_batch(images, instructions, tasks, seeds, steps=5, stop=lambda: checks.append(1) or True)
        assert len(checks) == 1  # one step ran, not five
    assert max_diff(bank.edit_batch(images, instructions, TASKS[:3], seeds, stop=lambda: False, **OPTS), expected) == 0


def test_the_vae_sees_one_image_at_a_time_and_keeps_its_setting(tiny_base, one_thread, monkeypatch):
    """A batch gains in the UNet, not in the VAE: batch_edit encodes and decodes each image alone (6x less peak
    memory for 8 images at 512 px, bench/batch_decode_memory.py), on both paths, and leaves use_slicing as it was."""
    bank = make_bank(tiny_base)
    vae = tiny_base.pipe.vae
    seen = []
    real_encode, real_decode = vae._encode, vae._decode
    monkeypatch.setattr(vae, "_encode", lambda x, *a, **k: seen.append(("encode", x.shape[0])) or real_encode(x, *a, **k))
    monkeypatch.setattr(vae, "_decode", lambda z, *a, **k: seen.append(("decode", z.shape[0])) or real_decode(z, *a, **k))
    images, instructions, seeds = batch_inputs(3)
    assert vae.use_slicing is False
    bank.edit_batch(images, instructions, ["cd_a", None, "lora_b"], seeds, **OPTS)  # per-row K/V path
    assert seen == [("encode", 1)] * 3 + [("decode", 1)] * 3, seen
    assert vae.use_slicing is False
    seen.clear()
    bank.edit(images[0], instructions[0], task="cd_a", seed=1, **OPTS)  # a single edit is untouched
    assert seen == [("encode", 1), ("decode", 1)], seen


def test_compiled_unet_changes_the_mix_without_recompiling(tiny_base, one_thread):
    import torch._dynamo

    bank = make_bank(tiny_base)
    images, instructions, seeds = batch_inputs(6)
    mixes = [TASKS[:6], ["lora_b", "cd_b", "cd_a", None, "lora_a", "lora_a"], [None] * 6, ["cd_b"] * 6]
    expected = [singles(bank, images, instructions, mix, seeds) for mix in mixes]
    bank.prepare()
    torch._dynamo.reset()
    bank.pipe.unet = torch.compile(bank.pipe.unet, backend="aot_eager")
    try:
        bank.edit_batch(images, instructions, mixes[0], seeds, **OPTS)  # compiles once
        with torch._dynamo.config.patch(error_on_recompile=True):
            for mix, want in zip(mixes, expected):
                assert max_diff(bank.edit_batch(images, instructions, mix, seeds, **OPTS), want) <= 1 / 255, mix
    finally:
        torch._dynamo.reset()


def test_images_of_two_sizes_run_as_two_calls(tiny_base, one_thread, monkeypatch):
    bank = make_bank(tiny_base)
    images = [random_image(0, 64), random_image(1, 48), random_image(2, 64), random_image(3, 48)]
    tasks, instructions, seeds = ["cd_a", "lora_a", "lora_b", None], ["a", "b", "c", "d"], [1, 2, 3, 4]
    calls = []
    pipe_class = type(bank.pipe)
    original = pipe_class.__call__
    monkeypatch.setattr(pipe_class, "__call__", lambda self, *a, **k: calls.append(len(k["image"])) or original(self, *a, **k))
    outputs = bank.edit_batch(images, instructions, tasks, seeds, **OPTS)
    assert sorted(calls) == [2, 2]
    monkeypatch.undo()
    assert [o.shape[:2] for o in outputs] == [(64, 64), (48, 48), (64, 64), (48, 48)]
    assert max_diff(outputs, singles(bank, images, instructions, tasks, seeds)) <= 1 / 255


def test_tasks_none_routes_each_instruction(tiny_base, one_thread):
    bank = make_bank(tiny_base)
    images, _, seeds = batch_inputs(3)
    instructions = ["derain the image", "make it snowy", "a photo of a cat on a sofa, oil painting"]
    outputs = bank.edit_batch(images, instructions, seeds=seeds, **OPTS)
    routed = [bank.route(text)[0] for text in instructions]
    assert routed[:2] == ["cd_a", "lora_a"]
    assert max_diff(outputs, singles(bank, images, instructions, routed, seeds)) <= 1 / 255


def test_lora_beyond_kv_runs_alone_and_is_refused_in_a_mix(tiny_base, one_thread):
    bank = make_bank(tiny_base)
    bank.add(random_lora(tiny_base, "attn", rank=4, seed=5, targets="attn"))
    images, instructions, seeds = batch_inputs(2)
    alone = bank.edit_batch(images, instructions, ["attn", "attn"], seeds, **OPTS)
    assert max_diff(alone, singles(bank, images, instructions, ["attn", "attn"], seeds)) <= 1 / 255
    with pytest.raises(AdapterkitError, match="cannot share a batch.*--targets kv"):
        bank.edit_batch(images, instructions, ["attn", "cd_a"], seeds, **OPTS)


def test_bad_lengths_and_unknown_tasks_are_refused(tiny_base):
    bank = make_bank(tiny_base)
    images, instructions, seeds = batch_inputs(2)
    with pytest.raises(AdapterkitError, match="2 images but 1 instructions"):
        bank.edit_batch(images, instructions[:1])
    with pytest.raises(AdapterkitError, match="1 seeds for 2 images"):
        bank.edit_batch(images, instructions, seeds=[1])
    with pytest.raises(AdapterkitError, match="no adapter for task 'nope'"):
        bank.edit_batch(images, instructions, ["nope", None])
    assert bank.edit_batch([], []) == []


def test_max_resident_keeps_the_most_recent_and_outputs_unchanged(tiny_base, one_thread):
    bank = make_bank(tiny_base, max_resident=2)
    assert bank.resident == ["lora_a", "lora_b"]  # the two added last
    assert bank.state_bytes("cd_a") == sum(t.numel() * 4 for t in bank.get("cd_a").tensors.values())
    images, instructions, seeds = batch_inputs(3)
    tasks = ["cd_a", "cd_b", "cd_a"]
    outputs = bank.edit_batch(images, instructions, tasks, seeds, **OPTS)
    assert bank.resident == ["cd_a", "cd_b"]
    bank.close()
    unbounded = make_bank(tiny_base)  # same adapters, no bound: same outputs
    assert max_diff(outputs, unbounded.edit_batch(images, instructions, tasks, seeds, **OPTS)) <= 1e-6
    with pytest.raises(ValueError, match="max_resident must be at least 1"):
        AdapterBank(tiny_base, max_resident=0)


def test_close_restores_the_original_attention_processors(tiny_base):
    before = {k: type(v) for k, v in tiny_base.unet.attn_processors.items()}
    bank = make_bank(tiny_base)
    assert {type(v).__name__ for v in tiny_base.unet.attn_processors.values()} == {"PerSampleKV", "IgnoreKV"}
    bank.close()
    assert {k: type(v) for k, v in tiny_base.unet.attn_processors.items()} == before


def test_jobs_file_in_batches_equals_one_job_at_a_time(tiny_base, tiny_base_dir, tmp_path, one_thread):
    """`adapterkit edit --jobs --batch-size 3` writes the same images as --batch-size 1 (issue 13)."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    from adapterkit.adapters import save_adapter
    from adapterkit.cli import main

    save_adapter(random_lora(tiny_base, "derain", rank=2, seed=1, instructions=["derain the image"]), str(tmp_path / "derain"))
    save_adapter(random_custom_diffusion(tiny_base, "cartoonize", seed=2, instructions=["cartoonize the image"]), str(tmp_path / "cartoonize"))
    for i in range(2):
        random_image(i).save(tmp_path / f"in{i}.png")
    rows = [{"image": "in0.png", "instruction": "derain the image", "adapter": "derain", "seed": 5},
            {"image": "in1.png", "instruction": "cartoonize the image"},
            {"image": "in0.png", "instruction": "x", "adapter": None},
            {"image": "missing.png", "instruction": "x"},
            {"image": "in1.png", "instruction": "remove the rain please", "adapter": "derain"},
            {"image": "in0.png", "instruction": "cartoonize the image", "adapter": "cartoonize", "seed": 9}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    outs = {}
    for size in (1, 3):
        result = CliRunner().invoke(main, ["edit", "--base", tiny_base_dir, "--adapter", str(tmp_path / "derain"), "--adapter",
                                           str(tmp_path / "cartoonize"), "--jobs", str(tmp_path / "jobs.jsonl"), "--output",
                                           str(tmp_path / f"out{size}"), "--batch-size", str(size), "--steps", "2", "--quiet"])
        assert result.exit_code == 0, result.output
        assert f"5 edited, 1 skipped, {5 if size == 1 else 2} batches" in result.output
        done = json.loads((tmp_path / f"out{size}" / "results.json").read_text())["done"]
        assert [r["adapter"] for r in done] == ["derain", "cartoonize", None, "derain", "cartoonize"]
        outs[size] = [np.asarray(Image.open(tmp_path / f"out{size}" / r["output"])).astype(int) for r in done]
    assert max(int(np.abs(a - b).max()) for a, b in zip(outs[1], outs[3])) <= 1  # uint8 rounding of <= 1e-5 differences
