"""`adapterkit merge` end to end: folders in, a loadable merged adapter out; edited images; LoRA export and fusing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from adapterkit.adapters import custom_diffusion, save_adapter
from adapterkit.adapters.bank import AdapterBank
from adapterkit.base import Base, compute_fingerprint, load_base
from adapterkit.cli import main
from adapterkit.inference import run_pipeline
from adapterkit.merge import merge
from adapterkit.testing import instruction_custom_diffusion, random_custom_diffusion, random_image, random_lora
from adapterkit.eval.metrics import psnr  # the one PSNR (data range 1, capped for identical images)

EDIT = {"steps": 3, "guidance": 7.0, "image_guidance": 1.5, "seed": 0}


pytestmark = pytest.mark.usefixtures("feature_cache")  # conftest.py: one cache outside the home


@pytest.fixture
def folders(tiny_base, tmp_path):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image", "remove rain"])
    b = random_lora(tiny_base, "cartoonize", rank=2, seed=2, instructions=["cartoonize the photo"])
    return save_adapter(a, str(tmp_path / "derain")), save_adapter(b, str(tmp_path / "cartoonize"))


def test_merged_images_stay_closer_to_each_task_than_linear():
    """Tiny base with 128-dim text features, adapters that change how their own instruction is read (as training
    does; see adapterkit.testing.instruction_custom_diffusion): lsq keeps each task's edit, the average dilutes both."""
    from adapterkit.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(0, text_dim=128)
    pipe.set_progress_bar_config(disable=True)
    base = Base(pipe=pipe, name_or_path="tiny-text128", fingerprint=compute_fingerprint(pipe.unet), resolution=64)
    instructions = {"derain": "derain the image", "cartoonize": "cartoonize the image"}
    sources = [instruction_custom_diffusion(base, t, [i], seed=s) for s, (t, i) in enumerate(instructions.items(), start=1)]
    merged = {m: merge(sources, base, m).adapter for m in ("lsq", "linear")}
    merged["lsq"].task, merged["linear"].task = "lsq", "linear"
    bank = AdapterBank(base)
    for adapter in [*sources, *merged.values()]:
        bank.add(adapter)
    image = random_image(0)
    for task, instruction in instructions.items():
        alone = bank.edit(image, instruction, task=task, steps=4, seed=0)
        scores = {m: psnr(bank.edit(image, instruction, task=m, steps=4, seed=0), alone) for m in merged}
        assert scores["lsq"] > scores["linear"] + 1.0, (task, scores)
    bank.deactivate()


def test_cli_merge_writes_a_folder_that_edit_loads(tiny_base_dir, folders, tmp_path):
    out = str(tmp_path / "merged")
    runner = CliRunner()
    result = runner.invoke(main, ["merge", *folders, "--base", tiny_base_dir, "--output", out, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "residual" in result.output and "drift" in result.output
    with open(os.path.join(out, "adapter.json")) as f:
        meta = json.load(f)
    assert meta["method"] == custom_diffusion.METHOD
    assert meta["instructions"] == ["cartoonize the photo", "derain the image", "remove rain"]
    assert meta["merge"]["method"] == "lsq"
    assert [s["task"] for s in meta["merge"]["sources"]] == ["derain", "cartoonize"]
    assert all(t["residual"] <= 1e-4 for t in meta["merge"]["report"]["tasks"])
    image = str(tmp_path / "in.png")
    random_image(0).save(image)
    edited = str(tmp_path / "out.png")
    result = runner.invoke(main, ["edit", "--base", tiny_base_dir, "--adapter", out, image, "--instruction", "derain the image",
                                  "--output", edited, "--steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert os.path.isfile(edited)


def test_as_lora_export_loads_in_plain_diffusers_and_matches_the_full_form(tiny_base_dir, folders, tmp_path):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    full = merge(list(folders), tiny_base_dir, "lsq", output=str(tmp_path / "full"))
    merge(list(folders), tiny_base_dir, "lsq", output=str(tmp_path / "lora"), as_lora=True)
    image = random_image(0)

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with_lora = run_pipeline(pipe, image, "derain the image", output_type="np", **EDIT)

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    custom_diffusion.swap_in(pipe.unet, full.adapter.tensors)
    with_full = run_pipeline(pipe, image, "derain the image", output_type="np", **EDIT)
    assert np.abs(with_lora - with_full).max() < 1e-4


def test_fuse_writes_a_pipeline_with_the_merge_baked_in(tiny_base_dir, folders, tmp_path):
    base = load_base(tiny_base_dir)
    before = base.fingerprint
    result = merge(list(folders), base, "lsq", output=str(tmp_path / "merged"), output_pipeline=str(tmp_path / "pipe"))
    assert compute_fingerprint(base.unet) == before  # the live base is restored after saving
    image = random_image(0)
    bank = AdapterBank(base)
    bank.add(result.adapter)
    want = bank.edit(image, "derain the image", output_type="np", **EDIT)
    fused = load_base(str(tmp_path / "pipe"))
    assert fused.resolution == base.resolution
    got = run_pipeline(fused.pipe, image, "derain the image", output_type="np", **EDIT)
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fuse"], "--output-pipeline"),
        (["--weights", "1,x", "--method", "sum"], "--weights"),
        (["--method", "svd"], "--rank"),
        (["--reg-prompts", "/nonexistent/prompts.txt"], "does not exist"),
        (["--ridge", "-1"], "--ridge must be >= 0"),
        (["--base-instructions-weight", "-1"], "--base-instructions-weight must be >= 0"),
        (["--method", "linear", "--base-instructions-weight", "5"], "applies to least squares"),
        (["--base-instructions-weight", "5"], "records none; drop the option"),  # the test base records no instructions
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny_base_dir, folders, tmp_path, extra, message):
    result = CliRunner().invoke(main, ["merge", *folders, "--base", tiny_base_dir, "--output", str(tmp_path / "m"), "--quiet", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not os.path.exists(tmp_path / "m")


def test_cli_refuses_an_adapter_folder_given_twice(tiny_base_dir, folders, tmp_path):
    """Session 23: `merge A ./A/` merged, counting A's rows twice and storing its task twice."""
    result = CliRunner().invoke(main, ["merge", folders[0], folders[0] + "/", folders[1], "--base", tiny_base_dir,
                                       "--output", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code == 2 and f"{folders[0]} is given twice; pass each adapter folder once" in result.output
    assert not os.path.exists(tmp_path / "m")


def test_cli_refuses_a_folder_from_another_base(tiny_base, folders, tmp_path):
    other = random_custom_diffusion(tiny_base, "other", seed=3)
    other.base = {"name_or_path": "elsewhere", "fingerprint": "0123456789abcdef"}
    path = save_adapter(other, str(tmp_path / "other"))
    result = CliRunner().invoke(main, ["merge", folders[0], path, "--base", tiny_base.name_or_path, "--output", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--force" in result.output


def test_merged_weights_are_float32_and_finite(tiny_base, folders):
    result = merge(list(folders), tiny_base, "lsq")
    for weight in result.adapter.tensors.values():
        assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
