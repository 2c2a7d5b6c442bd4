"""Procedural task library and the demo-data command (issue 6)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner

from adapterkit.cli import main
from adapterkit.demo import tasks
from adapterkit.errors import AdapterkitError


def _rows(task, n=4, split="train", resolution=64):
    examples = tasks.make_examples(task, n, seed=3, resolution=resolution, split=split)
    inputs = np.stack([e.input for e in examples]).astype(np.float32) / 255  # (n, H, W, 3)
    targets = np.stack([e.target for e in examples]).astype(np.float32) / 255
    return inputs, targets


def _detail(x):
    """Mean absolute Laplacian over (n, H, W, 3): high-frequency energy."""
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def test_examples_are_deterministic_and_independent_of_row_count():
    a = tasks.make_example("derain", 2, seed=5)
    b = tasks.make_examples("derain", 4, seed=5)[2]
    assert np.array_equal(a.input, b.input) and np.array_equal(a.target, b.target) and a.instruction == b.instruction
    c = tasks.make_example("derain", 2, seed=6)
    assert not np.array_equal(a.input, c.input)
    # Row i of every task starts from the same clean picture: the denoise target is derain's target.
    assert np.array_equal(tasks.make_example("denoise", 2, seed=5).target, a.target)


@pytest.mark.parametrize("resolution", [32, 96])
def test_every_task_gives_uint8_pairs_and_a_known_instruction(resolution):
    for name, spec in tasks.TASKS.items():
        ex = tasks.make_example(name, 0, resolution=resolution)
        assert ex.input.shape == ex.target.shape == (resolution, resolution, 3)
        assert ex.input.dtype == ex.target.dtype == np.uint8
        assert ex.instruction in spec.instructions and len(spec.instructions) >= 3
        assert not np.array_equal(ex.input, ex.target), name
    assert set(tasks.HELDOUT_TASKS) >= {"derain", "cartoonize", "denoise", "lowlight"}
    assert len(tasks.GENERAL_TASKS) >= 8 and not set(tasks.GENERAL_TASKS) & set(tasks.HELDOUT_TASKS)


def test_general_edits_change_the_image_in_the_named_direction():
    x, y = _rows("brighter")
    assert y.mean() > x.mean() + 0.05
    x, y = _rows("darker")
    assert y.mean() < x.mean() - 0.05
    x, y = _rows("contrast")
    assert tasks.luminance(y).std() > 1.3 * tasks.luminance(x).std()
    _, y = _rows("grayscale")
    assert np.abs(y[..., 0] - y[..., 1]).max() <= 1 / 255 and np.abs(y[..., 1] - y[..., 2]).max() <= 1 / 255
    x, y = _rows("invert")
    assert np.abs(x + y - 1).max() <= 1.01 / 255
    x, y = _rows("blur")
    assert _detail(y) < 0.6 * _detail(x)
    x, y = _rows("sharpen")
    assert _detail(y) > 1.5 * _detail(x)
    _, y = _rows("posterize")
    assert len(np.unique(np.round(y * 255))) <= 4
    _, y = _rows("sepia")
    assert (y[..., 0] >= y[..., 1]).all() and (y[..., 1] >= y[..., 2]).all()
    x, y = _rows("hue")
    assert np.abs(tasks.luminance(y) - tasks.luminance(x)).mean() < 0.05  # luma kept ...
    assert np.abs(y - x).mean() > 0.02  # ... colours moved


def test_heldout_tasks_degrade_the_input_or_restyle_the_target():
    x, y = _rows("derain")
    assert x.mean() > y.mean()  # streaks are light
    assert (x - y).max() > 0.3  # and visible
    x, y = _rows("denoise")
    assert _detail(x) > 2 * _detail(y)
    x, y = _rows("lowlight")
    assert x.mean() < 0.7 * y.mean()
    x, y = _rows("cartoonize")
    colours = lambda img: len(np.unique(np.round(img * 255).reshape(-1, 3), axis=0))  # noqa: E731
    assert all(colours(t) < colours(s) for s, t in zip(x, y))
    assert (y.min(axis=-1) < 0.1).mean() > (x.min(axis=-1) < 0.1).mean()  # dark outlines added


def test_train_and_eval_splits_use_disjoint_photographs():
    train = {name for name, _ in tasks.source_images("train")}
    held = {name for name, _ in tasks.source_images("eval")}
    assert held == set(tasks.EVAL_SOURCES) and train and not train & held
    a = tasks.clean_picture(0, 0, 64, "train")
    b = tasks.clean_picture(0, 0, 64, "eval")
    assert not np.array_equal(a, b)
    with pytest.raises(AdapterkitError, match="unknown split"):
        tasks.make_example("blur", 0, split="test")


def test_write_task_dataset_loads_with_datasets_imagefolder(tmp_path):
    import datasets

    out = str(tmp_path / "derain")
    tasks.write_task_dataset("derain", out, n=2, seed=0, resolution=32, quiet=True)
    # an earlier dataset is replaced whole (one with files added to it is refused: test_reliability_files.py)
    assert tasks.write_task_dataset("derain", out, n=3, seed=1, resolution=32, quiet=True) == out
    assert len(os.listdir(os.path.join(out, "input"))) == 3
    ds = datasets.load_dataset("imagefolder", data_dir=out, split="train")
    assert set(ds.column_names) == {"input_image", "edited_image", "edit_prompt"} and len(ds) == 3
    rows = [json.loads(line) for line in open(os.path.join(out, "metadata.jsonl"))]
    assert rows[1]["input_image_file_name"] == "input/00001.png"
    first = tasks.make_example("derain", 1, seed=1, resolution=32)
    i = [r["input_image_file_name"] for r in rows].index("input/00001.png")
    assert np.array_equal(np.asarray(ds[i]["input_image"]), first.input)
    assert np.array_equal(np.asarray(ds[i]["edited_image"]), first.target)
    assert ds[i]["edit_prompt"] == first.instruction
    info = json.load(open(os.path.join(out, tasks.DATASET_INFO_FILE)))
    assert info["task"] == "derain" and info["instructions"] == list(tasks.TASKS["derain"].instructions)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"task": "unrain"}, "unknown task 'unrain'"), ({"n": 0}, "at least 1"), ({"resolution": 60}, "multiple of 8")],
)
def test_write_task_dataset_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"task": "derain", "output": str(tmp_path / "d"), "n": 2, **kwargs}
    with pytest.raises(AdapterkitError, match=message):
        tasks.write_task_dataset(**args)
    assert not os.path.exists(tmp_path / "d")


def test_demo_data_command(tmp_path):
    out = str(tmp_path / "cartoon")
    result = CliRunner().invoke(main, ["demo-data", "--task", "cartoonize", "--output", out, "--rows", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(os.path.join(out, "edited"))) == ["00000.png", "00001.png"]
    bad = CliRunner().invoke(main, ["demo-data", "--task", "nope", "--output", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown task 'nope'" in bad.output


def test_demo_data_help_names_every_task_it_writes():
    """The --task help is written out (cli.py imports no demo code at start); it must not fall behind the tasks."""
    help_text = " ".join(CliRunner().invoke(main, ["demo-data", "--help"]).output.split())
    missing = [t for t in tasks.TASKS if t not in help_text]
    assert not missing, f"demo-data --help does not name {missing}"


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    assert tasks.psnr(a, a) == 100.0
    assert tasks.psnr(a, a + 51) == pytest.approx(20 * np.log10(255 / 51))


def test_demo_data_writes_several_tasks_into_one_folder(tmp_path):
    from adapterkit.data import load_edit_dataset

    out = str(tmp_path / "mixed")
    args = ["demo-data", "--task", "derain", "--task", "cartoonize", "--output", out, "--rows", "2", "--split", "eval", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(os.path.join(out, "input"))) == ["cartoonize-00000.png", "cartoonize-00001.png",
                                                              "derain-00000.png", "derain-00001.png"]
    info = json.load(open(os.path.join(out, tasks.DATASET_INFO_FILE)))
    assert [t["task"] for t in info["tasks"]] == ["derain", "cartoonize"] and info["rows_per_task"] == 2
    dataset = load_edit_dataset(out, task="cartoonize")  # the task selector finds each task's rows again
    assert len(dataset) == 2
    example = tasks.make_example("cartoonize", 1, 0, 64, split="eval")
    assert np.array_equal(np.asarray(Image.open(os.path.join(out, "edited", "cartoonize-00001.png"))), example.target)


def test_rain_mask_replays_the_streaks_of_the_row():
    """The derain measure's mask (issue 12) is where the generator drew rain: the input differs from the target
    there, and much less elsewhere."""
    for i in range(3):
        ex = tasks.make_example("derain", i, split="eval")
        mask = tasks.rain_mask(i, split="eval")
        diff = np.abs(ex.input.astype(np.float32) - ex.target.astype(np.float32)).mean(-1)
        assert 0.02 < mask.mean() < 0.5
        assert diff[mask].mean() > 3 * diff[~mask].mean()


def test_outline_f1_and_masked_psnr_measure_the_task():
    from adapterkit.demo import measures

    ex = tasks.make_example("cartoonize", 0, split="eval")
    assert measures.outline_f1(ex.target, ex.target) == 1.0
    assert measures.outline_f1(ex.input, ex.target) < 0.6  # the photograph has few of the drawn outlines
    blank = np.full_like(ex.target, 200)
    assert measures.outline_f1(blank, ex.target) == 0.0
    rain = tasks.make_example("derain", 0, split="eval")
    mask = tasks.rain_mask(0, split="eval")
    assert measures.masked_psnr(rain.target, rain.target, mask) == 100.0
    assert measures.masked_psnr(rain.input, rain.target, mask) < tasks.psnr(rain.input, rain.target) - 3
    with pytest.raises(ValueError):
        measures.masked_psnr(rain.input, rain.target, np.zeros_like(mask))
