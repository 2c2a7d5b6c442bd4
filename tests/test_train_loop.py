"""`train(cfg)` on a tiny base, CPU: what changes, the loss, diffusers compatibility, resume, NaN guard, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from adapterkit.testing import make_edit_dataset, random_image
from PIL import Image
from safetensors.torch import load_file

from adapterkit.adapters import load_adapter
from adapterkit.base import load_base
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.adapters import method_names
from adapterkit.train import TrainConfig, train
from adapterkit.train import loop as loop_module
from adapterkit.train.loop import TrainingInterrupted, conditioning_dropout
from adapterkit.train.validation import COLUMNS, label_height

METHODS = method_names()  # the registry's built-in methods; tests taking `method` get them from conftest
WEIGHT_FILES = {"custom-diffusion": "pytorch_custom_diffusion_weights.safetensors", "lora": "pytorch_lora_weights.safetensors"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_edit_dataset(tmp_path_factory.mktemp("train_data") / "invert", 12, size=32)


def small_config(trainable_base_dir, data_dir, output, method, **changes) -> TrainConfig:
    settings = dict(
        base=trainable_base_dir, data=data_dir, method=method, task="invert", output=str(output), resolution=32,
        steps=20, batch_size=2, learning_rate=1e-2, validation_steps=0, checkpoint_steps=0, quiet=True, log_with="none",
    )
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def trained(trainable_base_dir, data_dir, tmp_path_factory):
    """50 steps of each method (batch 8), with the Base object the loop trained kept for inspection."""
    results = {}
    for method in METHODS:
        used = []
        real_load_base = loop_module.load_base
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop_module, "load_base", lambda name: used.append(real_load_base(name)) or used[-1])
            output = tmp_path_factory.mktemp("trained") / method
            adapter = train(small_config(trainable_base_dir, data_dir, output, method, steps=50, batch_size=8,
                                         validation_steps=25, validation_rows=2, validation_inference_steps=2))
        results[method] = (adapter, used[0], str(output))
    return results


def _losses(output: str) -> list[float]:
    with open(os.path.join(output, "logs", "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_only_adapter_tensors_change_and_loss_falls(trained, trainable_base_dir, method):
    adapter, used_base, output = trained[method]
    fresh = load_base(trainable_base_dir)
    for part in ("unet", "vae", "text_encoder"):
        before = getattr(fresh.pipe, part).state_dict()
        after = {k.replace(".base_layer", ""): v for k, v in getattr(used_base.pipe, part).state_dict().items() if ".lora_" not in k}
        assert set(after) == set(before), part
        changed = sorted(k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype)))
        if method == "custom-diffusion" and part == "unet":
            kv = sorted(f"{name}.weight" for name in adapter.tensors)
            assert changed == kv and len(kv) == 12  # every attn2 K/V of the tiny UNet, nothing else
        else:
            assert changed == [], (part, changed[:3])
    if method == "lora":
        lora_keys = [k for k in used_base.pipe.unet.state_dict() if ".lora_" in k]
        assert lora_keys and all("attn2.to_k" in k or "attn2.to_v" in k for k in lora_keys)
        assert any(v.abs().max() > 0 for k, v in adapter.tensors.items() if k.endswith("lora_B.weight"))
    losses = _losses(output)
    assert len(losses) == 50
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert adapter.training["final_loss"] == pytest.approx(np.mean(losses[-10:]))
    assert adapter.training["initial_loss"] == pytest.approx(np.mean(losses[:10]))


def test_adapter_folder_contents(trained, method):
    adapter, _base, output = trained[method]
    assert os.path.isfile(os.path.join(output, WEIGHT_FILES[method]))
    meta = json.load(open(os.path.join(output, "adapter.json")))
    assert meta["method"] == method and meta["task"] == "invert" and meta["instructions"] == ["invert the image"]
    training = meta["training"]
    assert training["resolution"] == 32 and training["steps"] == 50 and training["optimizer"] == "adamw8bit"
    assert training["steps_done"] == 50 and training["final_loss"] > 0 and training["training_rows"] == 10
    assert meta["base"]["fingerprint"] == load_base(training["base"]).fingerprint
    for step in (25, 50):  # validation: a header naming the columns, then 2 held-out rows of input | target | output
        grid = Image.open(os.path.join(output, "validation", f"step-{step}.png"))
        assert grid.size == (3 * 32, label_height(32) + 2 * 32)
    loaded = load_adapter(output)
    assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_rows_used_are_recorded_and_the_validation_grid_is_labelled_issue_19(trained):
    _adapter, _base, output = trained["lora"]
    rows = json.load(open(os.path.join(output, "adapter.json")))["training"]["rows"]
    assert {k: rows[k] for k in ("in_data", "selected", "held_out", "training", "skipped", "without_instruction")} == {
        "in_data": 12, "selected": 12, "held_out": 2, "training": 10, "skipped": 0, "without_instruction": 0}
    assert len(rows["held_out_source_rows"]) == 2 and set(rows["held_out_source_rows"]) <= set(range(12))
    grid = Image.open(os.path.join(output, "validation", "step-50.png"))
    assert grid.info["columns"] == " | ".join(COLUMNS) == "input | target | output"
    header = np.asarray(grid.convert("L"))[: label_height(32)]
    for column in range(3):  # every column's label is drawn (dark text on white)
        assert header[:, column * 32:(column + 1) * 32].min() < 128, column


def test_cli_train_prints_the_rows_it_used_issue_19(trainable_base_dir, tmp_path):
    data = make_edit_dataset(tmp_path / "mixed", 10, size=32)
    lines = [json.loads(line) for line in open(tmp_path / "mixed" / "metadata.jsonl")]
    for k, row in enumerate(lines):  # rows 0-5: derain, 6-9: another task
        row["edit_prompt"] = "derain the image" if k < 6 else "cartoonize the image"
    (tmp_path / "mixed" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = CliRunner().invoke(main, ["train", "--base", trainable_base_dir, "--data", data, "--method", "lora",
                                       "--task", "derain", "--data-task", "derain", "--output", str(tmp_path / "out"),
                                       "--resolution", "32", "--steps", "1", "--batch-size", "1", "--validation-steps", "1",
                                       "--validation-rows", "2", "--validation-inference-steps", "1", "--log-with", "none",
                                       "--checkpoint-steps", "0"])
    assert result.exit_code == 0, result.output
    assert f"data: 10 rows in {data} (split train); 6 of task derain; 2 held out for validation, 4 to train on" in result.output
    assert "rows: 4 for training (0 skipped as unreadable), 2 held out for validation, of 10 in the data" in result.output
    assert "device: cpu, mixed precision no" in result.output  # where accelerate put it (session 21)


def test_lora_loads_in_plain_diffusers_and_matches_adapterkit_edit(trained, trainable_base_dir, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    _adapter, _base, output = trained["lora"]
    image = random_image(3, 32)
    image.save(tmp_path / "in.png")
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(trainable_base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(num_inference_steps=3, guidance_scale=7.0, image_guidance_scale=1.5, output_type="np")
    plain_base = pipe("invert the image", image=image, generator=torch.Generator("cpu").manual_seed(0), **settings).images[0]
    pipe.load_lora_weights(output)
    plain = pipe("invert the image", image=image, generator=torch.Generator("cpu").manual_seed(0), **settings).images[0]
    result = CliRunner().invoke(main, ["edit", "--base", trainable_base_dir, "--adapter", output, str(tmp_path / "in.png"),
                                       "--instruction", "invert the image", "--output", str(tmp_path / "out.png"),
                                       "--steps", "3", "--seed", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    ours = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float64)
    theirs = np.round(plain * 255)
    assert np.abs(ours - theirs).max() <= 1  # PNG rounding only
    assert np.abs(plain - plain_base).max() > 1e-3  # the trained LoRA does change the edit


class _Killed(BaseException):
    """Stands in for kill -9: nothing after it runs, no final save."""


def test_resume_after_kill_is_bitwise_identical(trainable_base_dir, data_dir, tmp_path, monkeypatch, method):
    whole = train(small_config(trainable_base_dir, data_dir, tmp_path / "whole", method, checkpoint_steps=10))

    real_save = loop_module._save_checkpoint

    def save_then_die(run, state):
        path = real_save(run, state)
        if state.step == 10:
            raise _Killed
        return path

    monkeypatch.setattr(loop_module, "_save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(small_config(trainable_base_dir, data_dir, tmp_path / "split", method, checkpoint_steps=10))
    monkeypatch.setattr(loop_module, "_save_checkpoint", real_save)
    assert not os.path.exists(tmp_path / "split" / "adapter.json")
    assert os.listdir(tmp_path / "split" / "checkpoints") == ["checkpoint-10"]
    resumed = train(small_config(trainable_base_dir, data_dir, tmp_path / "split", method, checkpoint_steps=10, resume="latest"))

    a = load_file(os.path.join(tmp_path / "whole", WEIGHT_FILES[method]))
    b = load_file(os.path.join(tmp_path / "split", WEIGHT_FILES[method]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(str(tmp_path / "whole")) == _losses(str(tmp_path / "split"))
    assert resumed.training["final_loss"] == whole.training["final_loss"]
    # a differently seeded run differs: the comparison above is not vacuous
    other = train(small_config(trainable_base_dir, data_dir, tmp_path / "seed1", method, steps=3, seed=1))
    assert _losses(str(tmp_path / "seed1")) != _losses(str(tmp_path / "whole"))[:3]
    assert any(not torch.equal(other.tensors[k], whole.tensors[k]) for k in whole.tensors)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(trainable_base_dir, data_dir, tmp_path, monkeypatch):
    real_loss = loop_module.ip2p_loss
    calls = []

    def loss_nan_at_step_7(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 7 else loss

    monkeypatch.setattr(loop_module, "ip2p_loss", loss_nan_at_step_7)
    output = tmp_path / "nan"
    with pytest.raises(AdapterkitError) as info:
        train(small_config(trainable_base_dir, data_dir, output, "custom-diffusion", steps=10, checkpoint_steps=5))
    message = str(info.value)
    assert "loss became nan at step 7" in message and "checkpoint-5" in message
    assert os.listdir(output / "checkpoints") == ["checkpoint-5"]
    assert not os.path.exists(output / "adapter.json")
    saved = load_adapter(str(output / "checkpoints" / "checkpoint-5" / "adapter"))
    assert all(torch.isfinite(t).all() for t in saved.tensors.values())


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(trainable_base_dir, data_dir, tmp_path, monkeypatch):
    real_log = loop_module._log

    def log_and_interrupt(run, step, *args):
        real_log(run, step, *args)
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends

    monkeypatch.setattr(loop_module, "_log", log_and_interrupt)
    output = tmp_path / "ctrlc"
    # the caller's handler: default_int_handler, or SIG_IGN when pytest runs as a background job of a
    # non-interactive shell (which starts it with SIGINT ignored)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"checkpoint saved to .*checkpoint-4.*--resume latest"):
        train(small_config(trainable_base_dir, data_dir, output, "lora", steps=8))
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert os.listdir(output / "checkpoints") == ["checkpoint-4"]
    monkeypatch.setattr(loop_module, "_log", real_log)
    adapter = train(small_config(trainable_base_dir, data_dir, output, "lora", steps=8, resume="latest"))
    assert adapter.training["steps_done"] == 8 and len(_losses(str(output))) == 8


def test_existing_checkpoints_need_resume(trainable_base_dir, data_dir, tmp_path):
    output = tmp_path / "again"
    train(small_config(trainable_base_dir, data_dir, output, "lora", steps=2, checkpoint_steps=2))
    with pytest.raises(AdapterkitError, match="already holds checkpoints.*--resume latest"):
        train(small_config(trainable_base_dir, data_dir, output, "lora", steps=2))
    with pytest.raises(AdapterkitError, match="not a checkpoint folder"):
        train(small_config(trainable_base_dir, data_dir, output, "lora", steps=2, resume=str(tmp_path)))
    with pytest.raises(AdapterkitError, match="method='lora'"):
        train(small_config(trainable_base_dir, data_dir, output, "custom-diffusion", steps=3, resume="latest"))


def test_conditioning_dropout_semantics():
    p = 0.05
    text, null = torch.ones(4, 77, 8), torch.zeros(1, 77, 8)
    image = torch.ones(4, 4, 2, 2)
    r = torch.tensor([0.01, 0.07, 0.12, 0.5])  # text only | both | image only | neither
    new_text, new_image = conditioning_dropout(text, null, image, r, p)
    assert new_text[:, 0, 0].tolist() == [0, 0, 1, 1]
    assert new_image[:, 0, 0, 0].tolist() == [1, 0, 0, 1]
    r = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    t, i = conditioning_dropout(torch.ones(len(r), 1, 1), torch.zeros(1, 1, 1), torch.ones(len(r), 1, 1, 1), r, p)
    dropped_text, dropped_image = t[:, 0, 0] == 0, i[:, 0, 0, 0] == 0
    for fraction in ((dropped_text & ~dropped_image).float().mean(), (dropped_text & dropped_image).float().mean(),
                     (~dropped_text & dropped_image).float().mean()):
        assert abs(float(fraction) - p) < 0.003


def test_cache_latents_synonyms_and_bf16(trainable_base_dir, data_dir, tmp_path):
    synonyms = tmp_path / "syn.txt"
    synonyms.write_text("negate the colours\ninvert the image\n")
    adapter = train(small_config(trainable_base_dir, data_dir, tmp_path / "cached", "lora", steps=3, cache_latents=True,
                                 instructions=("make it a negative",), instructions_file=str(synonyms),
                                 mixed_precision="bf16", optimizer="adamw"))
    assert adapter.instructions == ["make it a negative", "negate the colours", "invert the image"]
    assert json.load(open(tmp_path / "cached" / "adapter.json"))["instructions"] == adapter.instructions
    assert all(torch.isfinite(t).all() for t in adapter.tensors.values())


def test_latent_cache_flip_and_posterior(trainable_base_dir, data_dir):
    from adapterkit.data import load_edit_dataset
    from adapterkit.train.batches import LatentCache, encode_images, paired_transform

    pipe = load_base(trainable_base_dir).pipe
    ds = load_edit_dataset(data_dir)
    cache = LatentCache.build(ds, [0, 1, 2], pipe.vae, pipe.tokenizer, pipe.text_encoder, ["x"], 32, True, quiet=True)
    assert cache.cond.shape == (3, 2, 4, 16, 16) and set(cache.text) == {"", "x", "invert the image"}
    source, target = paired_transform(ds[1], 32, torch.Generator(), center_crop=True, random_flip=False)
    mode, mean, std = encode_images(pipe.vae, torch.stack([source.flip(-1), target.flip(-1)]))
    k = cache.rows[1]
    assert torch.allclose(cache.cond[k, 1], mode[0], atol=1e-5)  # condition: posterior mode of the flipped input
    assert torch.allclose(cache.mean[k, 1], mean[1], atol=1e-5) and torch.allclose(cache.std[k, 1], std[1], atol=1e-5)


def test_too_many_unreadable_rows_stop_training(trainable_base_dir, tmp_path):
    data = make_edit_dataset(tmp_path / "bad", 10, size=32, unreadable=(0, 1, 2, 3))
    with pytest.raises(AdapterkitError, match=r"rows have unreadable images, more than --max-skipped-fraction 0.1"):
        train(small_config(trainable_base_dir, data, tmp_path / "out", "lora", steps=10, batch_size=4))
    adapter = train(small_config(trainable_base_dir, data, tmp_path / "ok", "lora", steps=3, batch_size=4, max_skipped_fraction=0.5))
    assert 1 <= adapter.training["skipped_rows"] <= 4


def test_cli_train_with_toml_config_and_flag_override(trainable_base_dir, data_dir, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'base = "{trainable_base_dir}"\ndata = "{data_dir}"\nmethod = "custom-diffusion"\ntask = "invert"\n'
        f'output = "{tmp_path / "cli"}"\nresolution = 32\nsteps = 50\nbatch_size = 1\nvalidation_steps = 0\nlog_with = "none"\n'
    )
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--steps", "2", "--optimizer", "adamw", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"-> {tmp_path / 'cli'}" in result.output and "final loss" in result.output
    training = json.load(open(tmp_path / "cli" / "adapter.json"))["training"]
    assert training["steps"] == 2 and training["optimizer"] == "adamw" and training["batch_size"] == 1
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--input-column", "nope", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and "available columns: input_image, edited_image, edit_prompt" in result.output


def test_gradient_checkpointing_trains_the_same_adapter(trainable_base_dir, data_dir, tmp_path, method):
    plain = train(small_config(trainable_base_dir, data_dir, tmp_path / "plain", method, steps=2, optimizer="adamw"))
    checkpointed = train(small_config(trainable_base_dir, data_dir, tmp_path / "ckpt", method, steps=2, optimizer="adamw", gradient_checkpointing=True))
    assert checkpointed.training["gradient_checkpointing"] is True
    for key, value in plain.tensors.items():
        assert torch.allclose(checkpointed.tensors[key], value, atol=1e-6), key


def test_fp16_on_cpu_is_refused(trainable_base_dir, data_dir, tmp_path):
    with pytest.raises(AdapterkitError, match="fp16 needs a GPU"):
        train(small_config(trainable_base_dir, data_dir, tmp_path / "fp16", "lora", steps=1, mixed_precision="fp16"))


def test_training_into_another_tasks_adapter_folder_needs_overwrite(trainable_base_dir, tmp_path):
    """Session 21: `train --task cartoonize --output adapters/derain` silently replaced the derain adapter. Now it is
    one line and exit 2 with the folder untouched; --overwrite replaces it; rerunning the same task and method
    replaces its own adapter without the flag, as before."""
    data = make_edit_dataset(tmp_path / "data", 4, size=32)
    output = tmp_path / "adapters" / "derain"

    def train_cli(method, task, *extra):
        return CliRunner().invoke(main, ["train", "--base", trainable_base_dir, "--data", data, "--method", method,
                                         "--task", task, "--output", str(output), "--resolution", "32", "--steps", "1",
                                         "--batch-size", "1", "--validation-steps", "0", "--checkpoint-steps", "0",
                                         "--log-with", "none", "--quiet", *extra])

    assert train_cli("lora", "derain").exit_code == 0
    before = {name: (output / name).read_bytes() for name in os.listdir(output) if name.endswith((".json", ".safetensors"))}
    refused = train_cli("custom-diffusion", "cartoonize")
    assert refused.exit_code == 2, refused.output
    assert "already holds the lora adapter 'derain'; writing the custom-diffusion adapter 'cartoonize' there would replace it" in refused.output
    assert "--overwrite" in refused.output and len(refused.output.strip().splitlines()) == 1
    assert {name: (output / name).read_bytes() for name in before} == before
    assert train_cli("lora", "derain", "--seed", "1").exit_code == 0  # the same task and method: its own adapter
    assert train_cli("custom-diffusion", "cartoonize", "--overwrite").exit_code == 0
    assert json.loads((output / "adapter.json").read_text())["task"] == "cartoonize"


def test_a_dataset_too_small_to_hold_out_trains_whole_with_a_note(trainable_base_dir, tmp_path):
    """Session 22: 4 rows with the default 4 validation rows stopped with an error; a dataset with fewer than twice
    the validation rows now trains on every row, validation off, and says so."""
    data = make_edit_dataset(tmp_path / "four", 4, size=32)
    result = CliRunner().invoke(main, ["train", "--base", trainable_base_dir, "--data", data, "--method", "lora",
                                       "--task", "invert", "--output", str(tmp_path / "out"), "--resolution", "32",
                                       "--steps", "1", "--batch-size", "1", "--log-with", "none", "--checkpoint-steps", "0"])
    assert result.exit_code == 0, result.output
    assert "validation off: 4 rows are too few to hold out 4 (--validation-rows) and train on at least as many; every " \
           "row trains (pass --validation-rows 2 to validate on fewer)" in result.output
    assert "rows: 4 for training (0 skipped as unreadable), 0 held out for validation, of 4 in the data" in result.output
    assert not os.path.exists(tmp_path / "out" / "validation")
