"""`adapterkit edit` end to end, and the one-line errors with exit code 2 (issue 2)."""

from __future__ import annotations

import io
import json
import re
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from adapterkit.testing import random_custom_diffusion, random_image, random_lora
from PIL import Image

from adapterkit.adapters import save_adapter
from adapterkit.cli import main
from adapterkit.tiny import make_tiny_pipeline

FAST = ["--steps", "2"]


@pytest.fixture
def setup(tiny_base, tmp_path):
    """Two saved adapters (one per method) and an input image."""
    save_adapter(random_lora(tiny_base, "derain", rank=2, seed=1, instructions=["derain the image"]), str(tmp_path / "derain"))
    save_adapter(random_custom_diffusion(tiny_base, "cartoonize", seed=2, instructions=["cartoonize the image"]),
                 str(tmp_path / "cartoonize"))
    random_image(0).save(tmp_path / "in.png")
    return tmp_path


def run(args):
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr interleaved


def test_edit_single_image_writes_the_same_png_as_the_bank(setup, tiny_base_dir, tiny_base):
    code, out = run(["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), str(setup / "in.png"),
                     "--instruction", "derain the image", "--output", str(setup / "out.png"), "--quiet", *FAST])
    assert code == 0, out
    written = np.asarray(Image.open(setup / "out.png"))
    from adapterkit.adapters import load_adapter
    from adapterkit.adapters.bank import AdapterBank

    bank = AdapterBank(tiny_base)
    bank.add(load_adapter(str(setup / "derain")))
    expected = np.asarray(bank.edit(Image.open(setup / "in.png"), "derain the image", task="derain", steps=2))
    np.testing.assert_array_equal(written, expected)


def test_jobs_mode_routes_swaps_and_reports_bad_rows_by_line(setup, tiny_base_dir):
    jobs = setup / "jobs.jsonl"
    rows = [
        {"image": "in.png", "instruction": "derain the image", "adapter": "derain"},
        {"image": "in.png", "instruction": "cartoonize the image"},  # routed by instruction
        "not json",
        {"image": "in.png", "instruction": "derain the image", "adapter": "no-such-task"},
        {"image": "missing.png", "instruction": "derain the image"},
        {"image": "in.png", "instruction": "x", "adapter": None},  # the base alone
    ]
    jobs.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    code, out = run(["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), "--adapter",
                     str(setup / "cartoonize"), "--jobs", str(jobs), "--output", str(setup / "outs"), "--quiet", *FAST])
    assert code == 0, out
    assert "3 edited, 3 skipped" in out
    for line in ("line 3", "line 4: unknown adapter 'no-such-task'", "line 5: image"):
        assert line in out
    results = json.loads((setup / "outs" / "results.json").read_text())
    assert [r["adapter"] for r in results["done"]] == ["derain", "cartoonize", None]
    assert len(os.listdir(setup / "outs")) == 4  # three PNGs + results.json


def test_jobs_mode_reports_skipped_rows_in_file_order_issue_19(setup, tiny_base_dir):
    """Rows refused while reading (bad JSON, line 4) and rows failing when edited (lines 2, 3, 5) come out by line."""
    jobs = setup / "jobs.jsonl"
    rows = [
        {"image": "in.png", "instruction": "x", "adapter": None},
        {"image": "missing.png", "instruction": "derain the image"},
        {"image": "in.png", "instruction": "x", "adapter": "no-such-task"},
        "not json",
        {"image": "gone.png", "instruction": "x"},
        {"image": "in.png"},  # no instruction: refused while reading
    ]
    jobs.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    code, out = run(["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), "--jobs", str(jobs),
                     "--output", str(setup / "outs"), "--quiet", *FAST])
    assert code == 0, out
    reported = [int(line.split()[2].rstrip(":")) for line in out.splitlines() if line.startswith("skipped line")]
    assert reported == [2, 3, 4, 5, 6]
    errors = json.loads((setup / "outs" / "results.json").read_text())["errors"]
    assert [int(e.split(":")[0].split()[1]) for e in errors] == [2, 3, 4, 5, 6]


def test_several_images_and_an_image_file_output_are_refused_issue_19(setup, tiny_base_dir):
    random_image(1).save(setup / "in2.png")
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "in.png"), str(setup / "in2.png"),
                     "--instruction", "x", "--output", str(setup / "two.png"), "--quiet", *FAST])
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "2 input image(s) but --output" in out and "pass a folder" in out
    assert not (setup / "two.png").exists()  # nothing written, no folder named like an image
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "in.png"), str(setup / "in2.png"),
                     "--instruction", "x", "--output", str(setup / "outs"), "--quiet", *FAST])
    assert code == 0, out
    assert sorted(os.listdir(setup / "outs")) == ["in.png", "in2.png"]


def test_help_explains_every_option():
    code, out = run(["edit", "--help"])
    assert code == 0
    for option in ("--base", "--adapter", "--jobs", "--steps", "--guidance", "--image-guidance", "--seed", "--resolution"):
        assert option in out


def _corrupt(folder):
    path = folder / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _unknown_method(folder):
    meta = json.loads((folder / "adapter.json").read_text())
    meta["method"] = "dreambooth"
    (folder / "adapter.json").write_text(json.dumps(meta))


def _missing_weights(folder):
    (folder / "pytorch_lora_weights.safetensors").unlink()


def _other_base(folder):
    meta = json.loads((folder / "adapter.json").read_text())
    meta["base"]["fingerprint"] = "0123456789abcdef"
    (folder / "adapter.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_corrupt, "not a readable safetensors file"),
        (_unknown_method, "unknown adapter method 'dreambooth'"),
        (_missing_weights, "has no adapter weight file"),
        (_other_base, "was made for base 0123456789abcdef"),
    ],
)
def test_bad_adapters_give_one_line_and_exit_2(setup, tiny_base_dir, damage, message):
    damage(setup / "derain")
    before = sorted(os.listdir(setup))
    code, out = run(["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), str(setup / "in.png"),
                     "--instruction", "x", "--output", str(setup / "out.png"), *FAST])
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1
    assert sorted(os.listdir(setup)) == before  # nothing written


def test_console_script_exit_code_and_no_traceback(setup, tiny_base_dir):
    """The installed entry point, in a fresh process: mismatched shapes are refused even with --force."""
    narrow = setup / "narrow"
    pipe = make_tiny_pipeline(seed=0, text_dim=16)
    from adapterkit.base import Base, compute_fingerprint

    save_adapter(random_custom_diffusion(Base(pipe, "narrow", compute_fingerprint(pipe.unet)), "narrow"), str(narrow))
    proc = subprocess.run(
        [sys.executable, "-m", "adapterkit", "edit", "--base", tiny_base_dir, "--adapter", str(narrow), "--force",
         str(setup / "in.png"), "--instruction", "x", "--output", str(setup / "o.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: adapter layer ") and "has shape" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_edit_uses_the_sampler_defaults_the_base_records_issue_18(setup, tiny_base_dir, tiny_base):
    """builtin:tiny records guidance 3 / image guidance 2: edit uses a base's recorded defaults unless given, says
    which it used, and jobs mode records them in results.json; a base recording none gets the blog's 7 / 1.5."""
    import shutil

    from adapterkit.adapters import load_adapter
    from adapterkit.adapters.bank import AdapterBank

    recording = setup / "base"
    shutil.copytree(tiny_base_dir, recording)
    (recording / "adapterkit_base.json").write_text(json.dumps({"default_steps": 2, "default_guidance": 3.0, "default_image_guidance": 2.0}))
    args = ["edit", "--adapter", str(setup / "derain"), str(setup / "in.png"), "--instruction", "derain the image", "--quiet"]
    code, out = run([*args, "--base", str(recording), "--output", str(setup / "recorded.png")])
    assert code == 0, out
    assert "sampler: 2 steps, guidance 3, image guidance 2 (recorded by the base)" in out
    bank = AdapterBank(tiny_base)
    bank.add(load_adapter(str(setup / "derain")))
    expected = bank.edit(Image.open(setup / "in.png"), "derain the image", task="derain", steps=2, guidance=3.0, image_guidance=2.0)
    np.testing.assert_array_equal(np.asarray(Image.open(setup / "recorded.png")), np.asarray(expected))
    code, out = run([*args, "--base", tiny_base_dir, "--output", str(setup / "blog.png"), *FAST])
    assert code == 0 and "sampler: 2 steps, guidance 7, image guidance 1.5 (steps given; guidance, image guidance the IP2P blog's default)" in out, out
    jobs = setup / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": "in.png", "instruction": "derain the image"}) + "\n")
    code, out = run(["edit", "--base", str(recording), "--adapter", str(setup / "derain"), "--jobs", str(jobs),
                     "--output", str(setup / "outs"), "--quiet", "--guidance", "5"])
    assert code == 0, out
    sampler = json.loads((setup / "outs" / "results.json").read_text())["sampler"]
    assert sampler == {"steps": 2, "guidance": 5.0, "image_guidance": 2.0,
                       "source": {"steps": "base", "guidance": "given", "image_guidance": "base"}}


def test_edit_keeps_the_input_size_when_the_pipeline_rounds_it(setup, tiny_base_dir, tiny_base):
    """A 151 x 101 photo: the pipeline edits it at sides rounded down to its VAE's multiple; without --resolution the
    written result has the input's size again, in single-image and --jobs mode alike."""
    photo = random_image(3, 160).resize((151, 101))
    photo.save(setup / "odd.png")
    from adapterkit.adapters.bank import AdapterBank

    raw = AdapterBank(tiny_base).edit(photo, "x", task=None, steps=2)
    assert raw.size != (151, 101)  # what the pipeline alone returns: the rounded size
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "odd.png"), "--instruction", "x",
                     "--output", str(setup / "odd-out.png"), "--quiet", *FAST])
    assert code == 0, out
    single = Image.open(setup / "odd-out.png")
    assert single.size == (151, 101)
    np.testing.assert_array_equal(np.asarray(single), np.asarray(raw.resize((151, 101), Image.Resampling.BICUBIC)))
    (setup / "jobs.jsonl").write_text(json.dumps({"image": "odd.png", "instruction": "x", "adapter": None}) + "\n")
    code, out = run(["edit", "--base", tiny_base_dir, "--jobs", str(setup / "jobs.jsonl"), "--output", str(setup / "outs"),
                     "--quiet", *FAST])
    assert code == 0, out
    assert Image.open(setup / "outs" / "00001_odd.png").size == (151, 101)
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "odd.png"), "--instruction", "x", "--resolution", "64",
                     "--output", str(setup / "small.png"), "--quiet", *FAST])
    assert code == 0, out
    assert Image.open(setup / "small.png").size == (88, 64)  # an explicit resolution is the size asked for


def test_an_image_far_larger_than_the_training_size_is_edited_scaled_down_and_comes_back_at_its_size(
        setup, tiny_base_dir, tiny_base):
    """A phone photo edited at its own size held a CPU for hours. Without --resolution, a shorter side over 4x the
    base's training resolution is edited at that side (here 5x -> 4x) and resized back: the result is the edit at
    --resolution 4x, resized to the input's size. stderr says so once and names --resolution; --jobs does the same;
    at the training size, or with --resolution given, nothing is said and nothing is scaled."""
    side, largest = 5 * tiny_base.resolution, 4 * tiny_base.resolution
    random_image(4, 40).resize((side + 16, side), Image.Resampling.NEAREST).save(setup / "large.png")
    result = CliRunner().invoke(main, ["edit", "--base", tiny_base_dir, str(setup / "large.png"), "--instruction", "x",
                                       "--output", str(setup / "large-out.png"), "--steps", "1"])
    assert result.exit_code == 0, result.output
    width = (side + 16) * largest // side // 8 * 8  # resize_for_edit: shorter side -> largest, multiples of 8
    assert (f"note: large.png is {side + 16} x {side}: edited at {width} x {largest} (shorter side {largest}, 4x the "
            f"{tiny_base.resolution} px the base was trained at) and resized back; --resolution N") in result.stderr
    assert "steps: 100%" in result.stderr  # the pipeline's own step bar
    scaled = np.asarray(Image.open(setup / "large-out.png"), dtype=np.int16)
    assert scaled.shape == (side, side + 16, 3)  # the input's size
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "large.png"), "--instruction", "x", "--resolution",
                     str(largest), "--output", str(setup / "at-largest.png"), "--quiet", "--steps", "1"])
    assert code == 0, out
    at_largest = Image.open(setup / "at-largest.png")
    assert at_largest.size == (width, largest)
    expected = np.asarray(at_largest.resize((side + 16, side), Image.Resampling.BICUBIC), dtype=np.int16)
    assert np.abs(scaled - expected).max() <= 1
    (setup / "large-jobs.jsonl").write_text(json.dumps({"image": "large.png", "instruction": "x", "adapter": None,
                                                       "output": "large.png"}) + "\n")
    result = CliRunner().invoke(main, ["edit", "--base", tiny_base_dir, "--jobs", str(setup / "large-jobs.jsonl"),
                                       "--output", str(setup / "large-jobs"), "--steps", "1", "--quiet"])
    assert result.exit_code == 0 and "note: large.png is" in result.stderr, result.output
    jobs_pixels = np.asarray(Image.open(setup / "large-jobs" / "large.png"), dtype=np.int16)
    assert np.abs(jobs_pixels - scaled).max() <= 1
    for args in (["in.png"], ["large.png", "--resolution", str(tiny_base.resolution)]):
        result = CliRunner().invoke(main, ["edit", "--base", tiny_base_dir, str(setup / args[0]), *args[1:], "--instruction",
                                           "x", "--output", str(setup / "quiet.png"), "--quiet", "--steps", "1"])
        assert result.exit_code == 0, result.output
        assert "note:" not in result.stderr


def test_an_image_too_small_for_the_pipeline_gets_one_line_and_exit_2(setup, tiny_base_dir):
    """3 x 3 pixels: the pipeline would round a side to 0 and raise a ValueError. Single mode: one line naming the
    file and --resolution, exit 2, nothing written; --jobs: that row is skipped by line, the others are edited;
    with --resolution it is scaled up and edited."""
    Image.new("RGB", (3, 3), "red").save(setup / "dot.png")
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "dot.png"), "--instruction", "x",
                     "--output", str(setup / "dot-out.png"), "--quiet", *FAST])
    assert code == 2 and "dot.png is 3 x 3 pixels; images need at least 8 x 8: pass --resolution" in out, out
    assert "Traceback" not in out and not os.path.exists(setup / "dot-out.png")
    rows = [{"image": "in.png", "instruction": "x", "adapter": None}, {"image": "dot.png", "instruction": "x", "adapter": None}]
    (setup / "jobs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out = run(["edit", "--base", tiny_base_dir, "--jobs", str(setup / "jobs.jsonl"), "--output", str(setup / "outs"),
                     "--quiet", *FAST])
    assert code == 0 and "1 edited, 1 skipped" in out and "line 2: dot.png is 3 x 3 pixels" in out, out
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "dot.png"), "--instruction", "x", "--resolution", "8",
                     "--output", str(setup / "dot-out.png"), "--quiet", *FAST])
    assert code == 0, out
    assert Image.open(setup / "dot-out.png").size == (8, 8)


def test_an_output_name_without_an_image_extension_is_refused_before_any_work(setup, tiny_base_dir, monkeypatch):
    """Session 21: a single edit's --output without an extension failed only after the base load and the edit, and a
    jobs row's "output": "x.gif" stopped the whole run, later rows undone and no results.json."""
    import adapterkit.edit

    loads = []
    real = adapterkit.edit.load_base
    monkeypatch.setattr(adapterkit.edit, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    code, out = run(["edit", "--base", tiny_base_dir, str(setup / "in.png"), "--instruction", "x",
                     "--output", str(setup / "result"), *FAST])
    assert code == 2 and "must end in .png, .jpg or .webp (or be an existing folder)" in out, out
    assert len(out.strip().splitlines()) == 1 and not loads and not (setup / "result").exists()
    jobs = setup / "jobs.jsonl"
    rows = [{"image": "in.png", "instruction": "x", "adapter": None},
            {"image": "in.png", "instruction": "x", "adapter": None, "output": "x.gif"},
            {"image": "in.png", "instruction": "y", "adapter": None}]
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = run(["edit", "--base", tiny_base_dir, "--jobs", str(jobs), "--output", str(setup / "outs"),
                     "--batch-size", "1", "--quiet", *FAST])
    assert code == 0 and "2 edited, 1 skipped" in out and "line 2: output x.gif must end in .png" in out, out
    results = json.loads((setup / "outs" / "results.json").read_text())
    assert [r["line"] for r in results["done"]] == [1, 3]


def test_outputs_never_replace_an_input_or_each_other(setup, tiny_base_dir, monkeypatch):
    """Session 22: `edit photos/*.png --output photos` replaced the photographs with their edits, and a/x.png with
    b/x.jpg into one folder wrote both to x.png (the second result replacing the first). Both are refused before the
    base loads, files untouched; --overwrite edits in place. In a jobs file such rows are skipped by line."""
    import adapterkit.edit

    loads = []
    real = adapterkit.edit.load_base
    monkeypatch.setattr(adapterkit.edit, "load_base", lambda *a, **k: loads.append(a) or real(*a, **k))
    (setup / "other").mkdir()
    random_image(1).save(setup / "two.png")
    random_image(2).save(setup / "other" / "two.jpg")
    before = {name: (setup / name).read_bytes() for name in ("in.png", "two.png")}
    edit = ["edit", "--base", tiny_base_dir, "--instruction", "x", "--quiet", *FAST]
    code, out = run([*edit, str(setup / "in.png"), str(setup / "two.png"), "--output", str(setup)])
    assert code == 2 and f"output {setup / 'in.png'} is an input image, which the edit would replace" in out, out
    code, out = run([*edit, str(setup / "in.png"), "--output", str(setup / "in.png")])
    assert code == 2 and "--overwrite to edit in place" in out, out
    code, out = run([*edit, str(setup / "two.png"), str(setup / "other" / "two.jpg"), "--output", str(setup / "outs")])
    assert code == 2 and f"would both be written to {setup / 'outs' / 'two.png'}" in out, out
    assert not loads and {name: (setup / name).read_bytes() for name in before} == before
    code, out = run([*edit, str(setup / "in.png"), "--output", str(setup / "in.png"), "--overwrite"])
    assert code == 0 and (setup / "in.png").read_bytes() != before["in.png"], out
    jobs = setup / "jobs.jsonl"
    rows = [{"image": "two.png", "instruction": "x", "adapter": None, "output": "two.png"},
            {"image": "two.png", "instruction": "x", "adapter": None, "output": "a.png"},
            {"image": "in.png", "instruction": "y", "adapter": None, "output": "a.png"}]
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out = run(["edit", "--base", tiny_base_dir, "--jobs", str(jobs), "--output", str(setup), "--quiet", *FAST])
    assert code == 0 and "1 edited, 2 skipped" in out, out
    assert "line 1: output" in out and "two.png is an input image" in out and "line 3: output" in out and "is line 2's as well" in out
    assert (setup / "two.png").read_bytes() == before["two.png"]


def test_top_level_help_lists_every_command_whole_and_points_to_the_demo():
    """`adapterkit --help` is a new user's first screen: one untruncated line per command (click cut them at ~50
    characters with '...'), and where to start."""
    code, out = run(["--help"])
    commands = out.split("Commands:")[1]
    assert code == 0 and "..." not in commands and "adapterkit demo` runs the whole loop" in " ".join(out.split())
    for command in ("convert-base", "demo", "demo-data", "edit", "eval", "import", "make-tiny-base", "merge", "serve", "train"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 3 for line in commands.splitlines()), command


def test_jpeg_output_is_written_at_quality_95(setup, tiny_base_dir, tiny_base):
    """Pillow's default JPEG quality (75) put blocks on the edited detail; the same edit as a PNG and as a JPEG now
    differ by what quality 95 costs, measured on the PNG re-encoded by Pillow at 95 (same bytes)."""
    from PIL import Image

    paths = {ext: setup / f"out.{ext}" for ext in ("png", "jpg")}
    for path in paths.values():
        code, out = run(["edit", "--base", tiny_base_dir, str(setup / "in.png"), "--instruction", "x", "--output", str(path), "--quiet", *FAST])
        assert code == 0, out
    expected = io.BytesIO()
    Image.open(paths["png"]).save(expected, format="JPEG", quality=95)
    assert paths["jpg"].read_bytes() == expected.getvalue()


def test_a_folder_stands_for_its_images(setup, tiny_base_dir):
    """Session 22: `edit photos/ --output out/` stopped at click's "File 'photos' is a directory". A folder now
    stands for its image files (sorted; other files and subfolders left out), and its results go to a folder even
    when it holds one image; a folder without images is one line."""
    photos = setup / "photos"
    (photos / "sub").mkdir(parents=True)
    random_image(1).save(photos / "b.jpg")
    random_image(2).save(photos / "a.png")
    (photos / "notes.txt").write_text("not an image")
    random_image(3).save(photos / "sub" / "c.png")
    edit = ["edit", "--base", tiny_base_dir, "--instruction", "x", "--quiet", *FAST]
    code, out = run([*edit, str(photos), "--output", str(setup / "out")])
    assert code == 0 and out.splitlines()[-2:] == [str(setup / "out" / "a.png"), str(setup / "out" / "b.png")], out
    assert sorted(os.listdir(setup / "out")) == ["a.png", "b.png"]  # notes.txt and sub/ left out
    (setup / "one").mkdir()
    random_image(4).save(setup / "one" / "only.png")
    code, out = run([*edit, str(setup / "one"), "--output", str(setup / "out1")])
    assert code == 0 and (setup / "out1" / "only.png").is_file(), out
    (setup / "empty").mkdir()
    code, out = run([*edit, str(setup / "empty"), "--output", str(setup / "out2")])
    assert code == 2 and "folder" in out and "holds no image (.png, .jpg" in out and "Traceback" not in out, out


def test_a_routed_edit_says_where_it_went(setup, tiny_base_dir):
    """Session 22: with several adapters `edit` routed silently, so an adapter's edit and the base's looked alike."""
    edit = ["edit", "--base", tiny_base_dir, "--adapter", str(setup / "derain"), "--adapter", str(setup / "cartoonize"),
            str(setup / "in.png"), "--output", str(setup / "out.png"), "--quiet", *FAST]
    code, out = run([*edit, "--instruction", "derain the image"])
    assert code == 0 and "route: -> derain (an instruction the adapter stores)" in out, out
    code, out = run([*edit, "--instruction", "print the report"])
    assert code == 0 and re.search(r"route: -> base \(best score 0\.\d\d < threshold 0\.\d\d\)", out), out
