"""Edit datasets: sources, presets, column errors, the task selector, unreadable rows, the paired transform."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from adapterkit.testing import make_edit_dataset
from PIL import Image

from adapterkit.errors import AdapterkitError
from adapterkit.data import EditExample, load_edit_dataset, read_instructions_file, task_matches
from adapterkit.train.batches import paired_transform, sample_instruction


def test_local_folder_rows_are_rgb_examples(tmp_path):
    folder = make_edit_dataset(tmp_path / "d", 3, size=16, instructions=("invert it", "negate colours"))
    ds = load_edit_dataset(folder)
    assert len(ds) == 3 and ds.columns == ["input_image", "edited_image", "edit_prompt"]
    ex = ds[1]
    assert isinstance(ex, EditExample) and ex.instruction == "negate colours"
    assert ex.input.mode == "RGB" and ex.target.mode == "RGB" and ex.input.size == (16, 16)
    # default edit of the factory: inversion, so input + target = 255 everywhere
    assert (np.asarray(ex.input).astype(int) + np.asarray(ex.target)).min() == 255


def _as_csv(folder: str, bom: bool = False) -> str:
    """Rewrite `folder`'s metadata.jsonl as metadata.csv (the other imagefolder format) with the same rows."""
    import csv

    jsonl = os.path.join(folder, "metadata.jsonl")
    rows = [json.loads(line) for line in open(jsonl, encoding="utf-8")]
    os.remove(jsonl)
    with open(os.path.join(folder, "metadata.csv"), "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.mark.parametrize("bom", [False, True])
def test_metadata_csv_reads_as_its_jsonl_twin(tmp_path, bom):
    """Session 22: a folder described by metadata.csv (datasets' imagefolder reads both formats; its docs show the
    CSV first) was refused as 'neither a folder with metadata.jsonl ...'. A spreadsheet's byte-order mark is ignored."""
    instructions = ("invert it", "negate colours, please", 'say "invert"')  # commas and quotes survive CSV quoting
    jsonl = load_edit_dataset(make_edit_dataset(tmp_path / "j", 3, size=16, instructions=instructions))
    csv_ds = load_edit_dataset(_as_csv(make_edit_dataset(tmp_path / "c", 3, size=16, instructions=instructions), bom))
    assert csv_ds.columns == jsonl.columns == ["input_image", "edited_image", "edit_prompt"]
    assert csv_ds.read_from.endswith("metadata.csv")
    for a, b in zip(csv_ds, jsonl):
        assert a.instruction == b.instruction and np.array_equal(np.asarray(a.input), np.asarray(b.input))
        assert np.array_equal(np.asarray(a.target), np.asarray(b.target))


def test_bad_metadata_csv_is_one_line_naming_the_line(tmp_path):
    folder = _as_csv(make_edit_dataset(tmp_path / "d", 2, size=8))
    path = os.path.join(folder, "metadata.csv")
    lines = open(path, encoding="utf-8").read().splitlines()
    open(path, "w", encoding="utf-8").write("\n".join([lines[0], lines[1], "in/1.png,out/1.png"]) + "\n")
    with pytest.raises(AdapterkitError, match=r"metadata.csv line 3 has fewer values than the header's 3 columns"):
        load_edit_dataset(folder)
    open(path, "w", encoding="utf-8").write("\n".join([lines[0], "in/0.png,../../etc/passwd,x"]) + "\n")
    with pytest.raises(AdapterkitError, match=r"line 2: edited_image_file_name '../../etc/passwd' points outside"):
        load_edit_dataset(folder)
    open(os.path.join(folder, "metadata.jsonl"), "w").write("")
    with pytest.raises(AdapterkitError, match=r"holds both metadata.jsonl and metadata.csv; keep the one"):
        load_edit_dataset(folder)


def test_grayscale_and_alpha_images_become_rgb(tmp_path):
    folder = make_edit_dataset(tmp_path / "d", 1, size=8)
    Image.new("L", (8, 8), 100).save(tmp_path / "d" / "in" / "0.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "d" / "out" / "0.png")
    ex = load_edit_dataset(folder)[0]
    assert ex.input.mode == "RGB" and ex.input.getpixel((0, 0)) == (100, 100, 100)
    assert ex.target.getpixel((0, 0)) == (255, 255, 255)  # transparent composited on white


@pytest.mark.parametrize("preset", ["ip2p", "cartoonization", "low-level"])
def test_presets_and_detection(tmp_path, preset):
    from adapterkit.data import PRESETS

    folder = make_edit_dataset(tmp_path / preset, 2, size=8, columns=PRESETS[preset])
    explicit = load_edit_dataset(folder, preset=preset)
    detected = load_edit_dataset(folder)
    for ds in (explicit, detected):
        assert (ds.input_column, ds.target_column, ds.instruction_column) == PRESETS[preset]
        assert ds[0].instruction == "invert the image"


def test_missing_column_lists_available_columns(tmp_path):
    folder = make_edit_dataset(tmp_path / "d", 2, size=8, columns=("before", "after", "prompt"))
    with pytest.raises(AdapterkitError) as info:
        load_edit_dataset(folder)
    message = str(info.value)
    # every missing column in one line (session 23: one per run before)
    assert ("has no input column 'input_image' and no target column 'edited_image' and no instruction column "
            "'edit_prompt'; available columns: before, after, prompt; pass --input-column and --target-column and "
            "--instruction-column, or --preset") in message
    ds = load_edit_dataset(folder, input_column="before", target_column="after", instruction_column="prompt")
    assert ds[0].instruction == "invert the image"
    with pytest.raises(AdapterkitError, match="no instruction column 'caption'"):
        load_edit_dataset(folder, input_column="before", target_column="after", instruction_column="caption")


def test_instruction_column_optional_when_asked(tmp_path):
    folder = make_edit_dataset(tmp_path / "d", 2, size=8, columns=("input_image", "edited_image", "note"))
    with pytest.raises(AdapterkitError, match="instruction column"):
        load_edit_dataset(folder)
    ds = load_edit_dataset(folder, require_instruction=False)
    assert ds.instruction_column is None and ds[0].instruction == ""


def test_task_selector_keeps_one_task_of_the_low_level_set(tmp_path):
    instructions = ("derain the image", "deblur this photo", "remove the noise", "enhance the low-light image",
                    "remove rain streaks", "deblur and denoise the image")
    folder = make_edit_dataset(tmp_path / "d", 6, size=8, instructions=instructions,
                               columns=("input_image", "ground_truth_image", "instruction"))
    assert load_edit_dataset(folder, task="derain").instructions == ["derain the image", "remove rain streaks"]
    assert load_edit_dataset(folder, task="deblur").instructions == ["deblur this photo"]  # the composite belongs to neither
    assert load_edit_dataset(folder, task="low-light").instructions == ["enhance the low-light image"]
    assert load_edit_dataset(folder, task="streaks").instructions == ["remove rain streaks"]  # unknown task: substring
    assert len(load_edit_dataset(folder, task="derain", limit=1)) == 1
    with pytest.raises(AdapterkitError, match="no row of .* matches task 'dehaze'"):
        load_edit_dataset(folder, task="dehaze")


def test_task_matches_rule():
    assert task_matches("Derain The Image", "derain")
    assert not task_matches("derain and deblur", "derain")
    assert task_matches("brighten this dark photo", "lowlight")
    assert task_matches("make it look like a cartoon", "cartoonization")


def test_unreadable_rows_are_skipped_and_counted(tmp_path):
    folder = make_edit_dataset(tmp_path / "d", 4, size=8, unreadable=(1,))
    (tmp_path / "d" / "out" / "3.png").unlink()  # missing file
    ds = load_edit_dataset(folder)
    assert len(ds) == 4
    assert len(list(ds)) == 2  # iteration yields readable rows only
    assert sorted(ds.skipped) == [1, 3] and "missing file" in ds.skipped[3]
    assert ds.get(1) is None
    assert np.array_equal(np.asarray(ds[1].input), np.asarray(ds[2].input))  # indexing substitutes the next readable row


def test_bad_metadata_line_is_an_error(tmp_path):
    folder = make_edit_dataset(tmp_path / "d", 2, size=8)
    with open(tmp_path / "d" / "metadata.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(AdapterkitError, match="line 3 is not valid JSON"):
        load_edit_dataset(folder)


def test_split_folders_and_errors(tmp_path):
    make_edit_dataset(tmp_path / "d" / "test", 2, size=8)
    assert len(load_edit_dataset(str(tmp_path / "d"), split="test")) == 2
    with pytest.raises(AdapterkitError, match="neither a folder with metadata.jsonl"):
        load_edit_dataset(str(tmp_path / "d"))
    with pytest.raises(AdapterkitError, match="not a folder"):
        load_edit_dataset(str(tmp_path / "missing"))


def test_a_folder_holds_the_split_its_task_json_names_issue_19(tmp_path):
    """demo-data --split eval writes one top-level split named in task.json: --split eval reads it, the default
    --split train reads it too and says which split it was, any other split is refused naming the rule."""
    from adapterkit.data import SPLIT_INFO_FILE
    from adapterkit.demo.tasks import DATASET_INFO_FILE

    assert SPLIT_INFO_FILE == DATASET_INFO_FILE
    folder = make_edit_dataset(tmp_path / "eval", 2, size=8)
    (tmp_path / "eval" / SPLIT_INFO_FILE).write_text(json.dumps({"task": "invert", "split": "eval"}))
    for asked in ("eval", "train"):
        dataset = load_edit_dataset(folder, split=asked)
        assert (len(dataset), dataset.split, dataset.source_rows) == (2, "eval", 2)
        assert dataset.read_from == str(tmp_path / "eval" / "metadata.jsonl")
    with pytest.raises(AdapterkitError, match=r"holds one split, 'eval' .*task.json names it 'eval'\); pass --split eval"):
        load_edit_dataset(folder, split="test")
    plain = make_edit_dataset(tmp_path / "plain", 2, size=8)  # no task.json: imagefolder's rule, the train split
    assert load_edit_dataset(plain).split == "train"
    with pytest.raises(AdapterkitError, match=r"holds one split, 'train' .*top-level metadata.jsonl is the train split"):
        load_edit_dataset(plain, split="eval")


def test_save_to_disk_folder_with_image_columns(tmp_path):
    import datasets

    folder = make_edit_dataset(tmp_path / "d", 3, size=8, columns=("original_image", "cartoonized_image", "edit_prompt"))
    rows = [json.loads(line) for line in open(tmp_path / "d" / "metadata.jsonl")]
    table = {
        "original_image": [str(tmp_path / "d" / r["original_image_file_name"]) for r in rows],
        "cartoonized_image": [str(tmp_path / "d" / r["cartoonized_image_file_name"]) for r in rows],
        "edit_prompt": [r["edit_prompt"] for r in rows],
    }
    ds = datasets.Dataset.from_dict(table).cast_column("original_image", datasets.Image()).cast_column("cartoonized_image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    loaded = load_edit_dataset(str(tmp_path / "saved"))
    assert (loaded.input_column, loaded.target_column) == ("original_image", "cartoonized_image")
    assert np.array_equal(np.asarray(loaded[2].input), np.asarray(load_edit_dataset(folder)[2].input))
    with pytest.raises(AdapterkitError, match="no split 'validation'; available splits: train"):
        load_edit_dataset(str(tmp_path / "saved"), split="validation")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(AdapterkitError, match="not available offline"):
        load_edit_dataset("nobody-here/no-such-dataset-adapterkit")


def test_missing_local_path_is_refused_without_the_hub_issue_19(tmp_path, monkeypatch):
    """A mistyped folder used to go to the hub (5 retries, 28 s); path-like values are refused at once."""
    import adapterkit.data as data_module

    asked = []

    def hub(name, split):
        asked.append(name)
        raise LookupError("the hub was asked")

    monkeypatch.setattr(data_module, "_load_from_hub", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for source in ("data/nosuch", "./nosuch", "../nosuch", "~/nosuch-adapterkit", "a/b/c", "nosuch/", str(tmp_path / "x")):
        with pytest.raises(AdapterkitError, match=r"is not a folder \(nothing at .*\) and, being a path, is not looked up on the hub") as info:
            load_edit_dataset(source)
        assert source in str(info.value) and "\n" not in str(info.value)
    assert asked == []
    for hub_id in ("owner/name", "name"):  # no local folder 'owner': a hub id
        with pytest.raises(LookupError, match="the hub was asked"):
            load_edit_dataset(hub_id)
    assert asked == ["owner/name", "name"]


def test_cli_train_with_a_mistyped_data_path_exits_2_at_once_issue_19(tmp_path, monkeypatch):
    import time

    from click.testing import CliRunner

    from adapterkit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["train", "--base", "builtin:tiny-random", "--data", "data/nosuch", "--method", "lora",
                                       "--task", "derain", "--output", "out", "--quiet"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "data/nosuch is not a folder" in result.output and time.perf_counter() - start < 10
    code = ("import sys; from adapterkit.cli import main; sys.argv = ['adapterkit', 'train', '--base', 'b', '--data', "
            "'data/nosuch', '--method', 'lora', '--task', 't', '--output', 'o']\ntry:\n    main()\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code)")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout.split() == ["False", "2"], done.stdout + done.stderr  # refused before torch is imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_paired_transform_same_crop_and_flip_for_input_and_target():
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 256, (40, 60, 3), dtype=np.uint8)
    ex = EditExample(Image.fromarray(arr), Image.fromarray(255 - arr), "x")
    for seed in range(8):
        source, target = paired_transform(ex, 32, torch.Generator().manual_seed(seed))
        assert source.shape == target.shape == (3, 32, 32)
        assert source.min() >= -1 and source.max() <= 1
        # target = 255 - input pixelwise: the same crop and flip keep source + target == 0 (up to resampling)
        assert (source + target).abs().max() < 0.02
    a = paired_transform(ex, 32, torch.Generator().manual_seed(1))[0]
    b = paired_transform(ex, 32, torch.Generator().manual_seed(1))[0]
    c = paired_transform(ex, 32, torch.Generator().manual_seed(1), center_crop=True, random_flip=False)[0]
    assert torch.equal(a, b)  # seeded: reproducible
    crops = {paired_transform(ex, 32, torch.Generator().manual_seed(s))[0].sum().item() for s in range(8)}
    assert len(crops) > 1 and c.shape == (3, 32, 32)  # random crops differ; the center crop is one of the options


def test_instruction_sampling_and_file(tmp_path):
    synonyms = ["derain", "remove the rain", "clear the rain"]
    gen = torch.Generator().manual_seed(0)
    drawn = [sample_instruction("column text", synonyms, gen) for _ in range(60)]
    assert set(drawn) == set(synonyms)
    assert sample_instruction("column text", [], gen) == "column text"
    path = tmp_path / "syn.txt"
    path.write_text("# synonyms\nderain the image\n\nremove the rain\n")
    assert read_instructions_file(str(path)) == ["derain the image", "remove the rain"]
    path.write_text("\n# nothing\n")
    with pytest.raises(AdapterkitError, match="holds no instruction"):
        read_instructions_file(str(path))


def test_text_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Windows editors and spreadsheets start UTF-8 files with a BOM; it used to become part of the first line
    (a jobs file's first row: 'not valid JSON'; an instructions file's first instruction)."""
    from adapterkit.edit import read_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"image": "a.png", "instruction": "derain it"}\n', encoding="utf-8-sig")
    assert read_jobs(str(jobs)) == ([(1, {"image": "a.png", "instruction": "derain it"})], [])
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("derain the image\nremove the rain\n", encoding="utf-8-sig")
    assert read_instructions_file(str(instructions)) == ["derain the image", "remove the rain"]
