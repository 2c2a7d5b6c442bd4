"""--device / --dtype of edit, eval and serve (adapterkit/devices.py): auto picks the GPU when torch sees one, float32
unless asked, a bad or unreachable device is one line before the base loads, a bfloat16 base keeps its fingerprint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from adapterkit.adapters import load_adapter, save_adapter
from adapterkit.adapters.bank import AdapterBank
from adapterkit.base import load_base
from adapterkit.cli import main
from adapterkit.devices import pick_device, pick_dtype, placement
from adapterkit.errors import AdapterkitError
from adapterkit.testing import random_custom_diffusion, random_image, random_lora

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture
def setup(tiny_base, tmp_path):
    """A LoRA and a Custom Diffusion adapter made on the float32 base, an input image, a two-row dataset."""
    save_adapter(random_lora(tiny_base, "derain", rank=2, seed=1, instructions=["derain the image"]), str(tmp_path / "derain"))
    save_adapter(random_custom_diffusion(tiny_base, "cartoonize", seed=2, strength=3.0, instructions=["cartoonize it"]),
                 str(tmp_path / "cartoonize"))
    random_image(0).save(tmp_path / "in.png")
    os.makedirs(tmp_path / "data" / "in")
    os.makedirs(tmp_path / "data" / "out")
    with open(tmp_path / "data" / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i in range(2):
            random_image(10 + i).save(tmp_path / "data" / "in" / f"{i}.png")
            random_image(20 + i).save(tmp_path / "data" / "out" / f"{i}.png")
            f.write(json.dumps({"input_image_file_name": f"in/{i}.png", "edited_image_file_name": f"out/{i}.png",
                                "edit_prompt": "derain the image"}) + "\n")
    return tmp_path


def run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_auto_is_the_gpu_when_torch_sees_one_and_float32_unless_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement() == ("cuda", torch.float32)
    assert placement("auto", "float16") == ("cuda", torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert placement() == ("cpu", torch.float32)
    assert pick_device("cpu") == "cpu" and pick_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(AdapterkitError, match="not one of float32, float16, bfloat16"):
        pick_dtype("half")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device, message", [
    ("cuda", "sees no CUDA GPU; pass --device cpu"),
    ("gpu", "--device 'gpu' is not a device torch knows"),
])
def test_a_device_torch_cannot_use_is_one_line_and_exit_2_before_the_load(setup, tiny_base_dir, monkeypatch, device, message):
    import adapterkit.edit
    import adapterkit.eval.run

    loads = []
    monkeypatch.setattr(adapterkit.edit, "load_base", lambda *a, **k: loads.append(a))
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "in.png"), "--instruction", "x",
                     "--output", str(setup / "out.png"), "--device", device, *FAST])
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1, out
    assert not loads and not (setup / "out.png").exists()
    code, out = run(["eval", "--base", tiny_base_dir, "--data", str(setup / "data"), "--adapter", str(setup / "derain"),
                     "--output", str(setup / "report"), "--device", device, *FAST])
    assert code == 2 and message in out, out
    assert not (setup / "report").exists()
    pytest.importorskip("uvicorn")
    code, out = run(["serve", "--base", tiny_base_dir, "--port", "0", "--device", device])
    assert code == 2 and message in out, out
    with pytest.raises(AdapterkitError, match="cuda:9"):
        pick_device("cuda:9")


def test_a_bfloat16_base_keeps_its_fingerprint_and_takes_adapters_made_in_float32(setup, tiny_base_dir):
    """Before session 21 the fingerprint was computed after the cast: K/V rounded to bfloat16, then to float16,
    differ from float32 rounded to float16, so every adapter was refused as made for another base."""
    reference = load_base(tiny_base_dir)
    half = load_base(tiny_base_dir, dtype=torch.bfloat16)
    assert half.pipe.unet.dtype == torch.bfloat16 and half.pipe.vae.dtype == torch.bfloat16
    assert half.fingerprint == reference.fingerprint
    outputs = {}
    for name, base in (("float32", reference), ("bfloat16", half)):
        bank = AdapterBank(base)
        for task in ("derain", "cartoonize"):
            bank.add(load_adapter(str(setup / task)))
        images = bank.edit_batch([random_image(0)] * 3, ["derain the image", "cartoonize it", "x"],
                                 tasks=["derain", "cartoonize", None], seeds=[0, 1, 2], steps=2)
        outputs[name] = np.stack([np.asarray(i).astype(np.int16) for i in images])
    difference = np.abs(outputs["float32"] - outputs["bfloat16"])
    assert difference.mean() < 3.0, difference.mean()  # the same edits at bfloat16's precision (measured: ~1/255)


def test_edit_runs_in_the_dtype_asked_and_says_so(setup, tiny_base_dir):
    common = ["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), str(setup / "in.png"),
              "--instruction", "derain the image", *FAST]
    code, out = run([*common, "--output", str(setup / "f32.png")])
    assert code == 0 and "device: cpu, float32" in out, out
    code, out = run([*common, "--output", str(setup / "f16.png"), "--dtype", "float16"])
    assert code == 0 and "device: cpu, float16 (slow on a CPU: float32 or bfloat16 run faster)" in out, out
    difference = np.abs(_png(setup / "f32.png") - _png(setup / "f16.png"))
    assert 0 < difference.sum() and difference.mean() < 1.0  # float16 ran (other last bits), to within 1/255 on average
    jobs = setup / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": "in.png", "instruction": "derain the image", "adapter": "derain"}) + "\n")
    code, out = run(["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), "--jobs", str(jobs),
                     "--output", str(setup / "jobs"), "--dtype", "bfloat16", *FAST])
    assert code == 0, out
    results = json.loads((setup / "jobs" / "results.json").read_text())
    assert results["device"] == {"device": "cpu", "dtype": "bfloat16"}


def test_eval_records_the_dtype_and_does_not_reuse_outputs_of_another(setup, tiny_base_dir):
    output = str(setup / "report")
    common = ["eval", "--base", tiny_base_dir, "--data", str(setup / "data"), "--adapter", str(setup / "derain"),
              "--output", output, "--resolution", "32", *FAST]
    code, out = run(common)
    assert code == 0 and "device: cpu, float32" in out and "4 images generated, 0 from cache" in out, out
    code, out = run([*common, "--dtype", "bfloat16"])
    assert code == 0 and "device: cpu, bfloat16" in out, out
    assert "4 images generated, 0 from cache" in out  # float32's cached outputs are not bfloat16's
    report = json.loads(open(os.path.join(output, "report.json"), encoding="utf-8").read())
    assert (report["generation"]["device"], report["generation"]["dtype"]) == ("cpu", "bfloat16")
    code, out = run([*common, "--dtype", "bfloat16"])
    assert code == 0 and "0 images generated, 4 from cache" in out, out
