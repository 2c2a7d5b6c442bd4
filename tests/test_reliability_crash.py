"""Crash safety of `adapterkit train` under kill -9, and datasets with nothing to train on (issue 7).

Each crash test runs `python -m adapterkit train` in a subprocess with ADAPTERKIT_FAULT_INJECT naming a moment
(adapterkit/faults.py): the process SIGKILLs itself there. Then, before anything else touches the output: every
listed checkpoint loads completely, and the output path holds no adapter or the old one byte for byte. Then
`adapterkit train ... --resume latest` finishes, leaves no temporary files, and writes the same adapter, bit for
bit, as a run that was never killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from adapterkit.testing import make_edit_dataset
from PIL import Image

from adapterkit.adapters import load_adapter
from adapterkit.cli import main
from adapterkit.faults import VARIABLE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "pytorch_custom_diffusion_weights.safetensors", "adapter.json", "README.md")
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_edit_dataset(tmp_path_factory.mktemp("crash_data") / "invert", 8, size=32)


def train_args(trainable_base_dir, data_dir, output, *, method="lora", seed=0, checkpoint_steps=2, limit=2) -> list[str]:
    return [
        "train", "--base", trainable_base_dir, "--data", data_dir, "--method", method, "--task", "invert", "--output", str(output),
        "--resolution", "32", "--steps", str(STEPS), "--batch-size", "1", "--optimizer", "adamw", "--seed", str(seed),
        "--validation-steps", "0", "--checkpoint-steps", str(checkpoint_steps), "--checkpoints-total-limit", str(limit),
        "--log-with", "none", "--quiet",
    ]


def run_cli(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def reference(trainable_base_dir, data_dir, tmp_path_factory):
    """The weights of runs that were never killed, per (method, seed)."""
    found = {}
    for method, seed in (("lora", 0), ("custom-diffusion", 0)):
        output = tmp_path_factory.mktemp("reference") / "out"
        run_cli(train_args(trainable_base_dir, data_dir, output, method=method, seed=seed))
        found[method, seed] = load_adapter(str(output)).tensors
    return found


def kill_at(point: str, args: list[str]) -> None:
    """Run `adapterkit train` in a subprocess that SIGKILLs itself at `point`; insist that it did."""
    env = {**os.environ, VARIABLE: point, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "adapterkit", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: rc={proc.returncode}\n{proc.stderr[-2000:]}"


# -------------------------------------------------------------------------------------------------- what we check
def checkpoint_steps_listed(output) -> list[int]:
    """Every `checkpoint-N` folder there is, asserting that each one is complete and loads."""
    folder = os.path.join(output, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    steps = sorted(int(n.split("-")[1]) for n in names if re.fullmatch(r"checkpoint-\d+", n))
    for step in steps:
        path = os.path.join(folder, f"checkpoint-{step}")
        state = json.load(open(os.path.join(path, "trainer_state.json")))
        assert state["step"] == step and len(state["losses"]) == step
        assert load_adapter(os.path.join(path, "adapter")).training["steps_done"] == step
        for name in ("optimizer.bin", "scheduler.bin"):
            torch.load(os.path.join(path, name), weights_only=True)  # plain tensors and numbers, complete
        assert os.path.isfile(os.path.join(path, "random_states_0.pkl"))
    return steps


def adapter_digest(output) -> dict[str, str]:
    """sha256 of the adapter's own files at the output path ({} when there is no adapter there)."""
    return {n: hashlib.sha256(open(os.path.join(output, n), "rb").read()).hexdigest()
            for n in ADAPTER_FILES if os.path.isfile(os.path.join(output, n))}


def temporaries(output) -> list[str]:
    """Hidden temporary entries of the output: beside it, and anywhere inside it."""
    output = str(output)
    found = [n for n in os.listdir(os.path.dirname(output)) if n.startswith(f".{os.path.basename(output)}.")]
    for root, dirs, files in os.walk(output):
        found += [os.path.join(root, n) for n in dirs + files if n.startswith(".")]
    return found


def assert_resume_finishes(args, output, reference_tensors, checkpoints_after):
    result = run_cli(args + ["--resume", "latest"])
    assert f"-> {output}" in result.output
    adapter = load_adapter(str(output))
    assert adapter.training["steps_done"] == STEPS
    assert adapter.tensors.keys() == reference_tensors.keys()
    assert all(torch.equal(adapter.tensors[k], reference_tensors[k]) for k in reference_tensors)  # == never killed
    rows = [json.loads(line)["step"] for line in open(os.path.join(output, "logs", "train_log.jsonl"))]
    assert rows == list(range(1, STEPS + 1))  # the log reads like one run: the killed run's extra rows are gone
    assert checkpoint_steps_listed(output) == checkpoints_after
    assert temporaries(output) == []  # what the kill left behind was cleaned, and did not block the run


# -------------------------------------------------------------------------------------------------- the moments
# (fault point, checkpoints-total-limit, checkpoints listed after the kill, temporaries the kill left, after resume)
MOMENTS = {
    # a: mid optimizer step 2 (gradients computed, weights not updated): no checkpoint yet
    "step-before-checkpoint": ("train.step:2", 2, [], False, [4, 6]),
    # b: mid step 5, checkpoints 2 and 4 exist
    "step-after-checkpoint": ("train.step:5", 2, [2, 4], False, [4, 6]),
    # c: checkpoint-4 half written in its temporary folder
    "checkpoint-half-written": ("checkpoint.write:2", 2, [2], True, [4, 6]),
    # c': checkpoint-4 complete and flushed in its temporary folder, not yet renamed
    "checkpoint-before-rename": ("atomic_folder.checkpoint-4", 2, [2], True, [4, 6]),
    # d: checkpoint-4 renamed in, checkpoint-2 not yet pruned (limit 1)
    "checkpoint-before-prune": ("checkpoint.saved:2", 1, [2, 4], False, [6]),
    # d': checkpoint-2 hidden for pruning, not yet deleted
    "checkpoint-mid-prune": ("discard.checkpoint-2", 1, [4], True, [6]),
    # e: final adapter half assembled in its temporary folder (no adapter at the output yet)
    "final-save-half-written": ("publish.write", 2, [4, 6], True, [4, 6]),
    # e': final adapter complete in its temporary folder, not yet renamed over the output
    "final-save-before-rename": ("atomic_folder.out", 2, [4, 6], True, [4, 6]),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_leaves_no_corrupt_checkpoint_and_resume_finishes(trainable_base_dir, data_dir, reference, tmp_path, moment):
    point, limit, listed, leaves_temporaries, after = MOMENTS[moment]
    output = tmp_path / "out"
    args = train_args(trainable_base_dir, data_dir, output, limit=limit)
    kill_at(point, args)
    assert checkpoint_steps_listed(output) == listed
    assert adapter_digest(output) == {}  # no adapter, and above all no partial one
    assert bool(temporaries(output)) == leaves_temporaries  # it died where we said (inside a temporary) or not
    assert_resume_finishes(args, output, reference["lora", 0], after)


@pytest.mark.parametrize("point", ["publish.write", "atomic_folder.out"])
def test_kill_9_during_final_save_keeps_the_existing_adapter(trainable_base_dir, data_dir, reference, tmp_path, point):
    """f: OUTPUT holds an adapter from an earlier run; a new run killed while saving leaves it byte-identical."""
    output = tmp_path / "out"
    run_cli(train_args(trainable_base_dir, data_dir, output, method="custom-diffusion", seed=1, checkpoint_steps=0))
    old = adapter_digest(output)
    assert set(old) == {"pytorch_custom_diffusion_weights.safetensors", "adapter.json", "README.md"}
    args = train_args(trainable_base_dir, data_dir, output, method="custom-diffusion")
    kill_at(point, args)
    assert adapter_digest(output) == old
    assert load_adapter(str(output)).training["seed"] == 1
    assert checkpoint_steps_listed(output) == [4, 6]
    assert temporaries(output)  # the new adapter's temporary folder, cleaned by the next run
    assert_resume_finishes(args, output, reference["custom-diffusion", 0], [4, 6])
    assert adapter_digest(output) != old


def test_a_folder_left_moved_aside_is_put_back(trainable_base_dir, data_dir, reference, tmp_path):
    """Without renameat2 (not Linux, or a file system without RENAME_EXCHANGE) OUTPUT is replaced by two renames;
    a kill between them leaves it at `.out.old-<host>-<pid>-*`. The next run puts it back, checkpoints and all."""
    from adapterkit import fileio

    output = tmp_path / "out"
    args = train_args(trainable_base_dir, data_dir, output)
    kill_at("train.step:5", args)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".out.old-{fileio._host()}-{dead}-x1"
    os.rename(output, aside)  # the state between the two renames, owned by a process that no longer runs
    live = tmp_path / f".out.tmp-{fileio._host()}-{os.getpid()}-x2"  # a live process's temporary is never touched,
    elsewhere = tmp_path / f".out.tmp-00000000-{dead}-x3"  # nor one made on another host (a shared file system)
    live.mkdir()
    elsewhere.mkdir()
    assert fileio.clean_stale(str(tmp_path), "out") == [str(aside)]
    assert live.is_dir() and elsewhere.is_dir() and checkpoint_steps_listed(output) == [2, 4]
    live.rmdir()
    elsewhere.rmdir()
    assert_resume_finishes(args, output, reference["lora", 0], [4, 6])


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_folder_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
    from adapterkit import fileio

    real, swaps = fileio._exchange, []
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: swaps.append(exchange and real(a, b)) or swaps[-1])
    target = tmp_path / "adapter"
    for version in ("old", "new"):
        with fileio.atomic_folder(str(target)) as tmp:
            (tmp_path / tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "new" and os.listdir(tmp_path) == ["adapter"]
    assert swaps == [exchange and sys.platform.startswith("linux")]  # one replacement; Linux swaps in one step


def test_a_torn_log_line_does_not_block_resume(tmp_path):
    """A crash mid-write can leave half a JSON line at the end of train_log.jsonl: resume drops it, not crashes."""
    from adapterkit.train.checkpoints import truncate_log as _truncate_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    _truncate_log(str(log), 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    _truncate_log(str(log), 0)  # a new run starts a new log
    assert log.read_text() == ""


# -------------------------------------------------------------------------------------------------- nothing to train on
def refused(args, output, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), result.output
    assert "Traceback" not in result.output
    assert not os.path.exists(output) and temporaries(output) == []  # nothing written at the output path


def copy_images(data_dir, folder) -> None:
    for sub in ("in", "out"):  # copies: symlinks out of the folder are refused as escaping paths
        shutil.copytree(os.path.join(data_dir, sub), os.path.join(folder, sub))


def write_rows(folder, rows) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_empty_datasets_are_refused(trainable_base_dir, tmp_path):
    output = tmp_path / "out"
    no_rows = write_rows(tmp_path / "no_rows", [])
    refused(train_args(trainable_base_dir, no_rows, output), output, r"has no rows; add rows")
    (tmp_path / "no_rows" / "metadata.jsonl").write_text("\n\n")  # blank lines only
    refused(train_args(trainable_base_dir, no_rows, output), output, r"has no rows; add rows")
    (tmp_path / "empty").mkdir()  # no metadata.jsonl, no images
    refused(train_args(trainable_base_dir, str(tmp_path / "empty"), output), output, r"neither a folder with metadata.jsonl")
    rows = [{"input_image_file_name": f"in/{i}.png", "edited_image_file_name": f"out/{i}.png", "edit_prompt": "invert"}
            for i in range(4)]
    missing = write_rows(tmp_path / "missing", rows)  # rows, but not one image file
    refused(train_args(trainable_base_dir, missing, output), output, r"rows have unreadable images|no training row .* has readable images")


@pytest.mark.parametrize("value", ["", None, "   "])
def test_an_empty_instruction_column_is_refused(trainable_base_dir, data_dir, tmp_path, value):
    rows = [{**json.loads(line), "edit_prompt": value} for line in open(os.path.join(data_dir, "metadata.jsonl"))]
    folder = write_rows(tmp_path / "data", rows)
    copy_images(data_dir, folder)
    output = tmp_path / "out"
    refused(train_args(trainable_base_dir, folder, output), output, r"every row of .* has an empty instruction in column 'edit_prompt'")
    # instructions given another way make the column unnecessary
    (tmp_path / "instructions.txt").write_text("invert the image\nnegate the colours\n")
    run_cli(train_args(trainable_base_dir, folder, output, checkpoint_steps=0) + ["--instructions", str(tmp_path / "instructions.txt")])
    assert load_adapter(str(output)).instructions == ["invert the image", "negate the colours"]


def test_rows_with_an_empty_instruction_are_left_out(trainable_base_dir, data_dir, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "metadata.jsonl"))]
    rows[1]["edit_prompt"], rows[5]["edit_prompt"] = "", None
    folder = write_rows(tmp_path / "data", rows)
    copy_images(data_dir, folder)
    result = run_cli(train_args(trainable_base_dir, folder, tmp_path / "out", checkpoint_steps=0))
    assert "2 rows of" in result.output and "have an empty instruction and are left out" in result.output
    training = load_adapter(str(tmp_path / "out")).training
    assert training["training_rows"] == 6 and training["rows_without_instruction"] == 2


def test_images_smaller_than_the_resolution_are_upscaled(trainable_base_dir, tmp_path):
    """Documented behaviour: the shorter side is scaled up to --resolution (bicubic), as diffusers' IP2P script does."""
    from adapterkit.data import load_edit_dataset
    from adapterkit.train.batches import paired_transform, to_tensor

    data = make_edit_dataset(tmp_path / "small", 6, size=16)
    example = load_edit_dataset(data)[0]
    source, target = paired_transform(example, 64, torch.Generator().manual_seed(0), center_crop=True, random_flip=False)
    assert source.shape == target.shape == (3, 64, 64)
    assert torch.allclose(source, to_tensor(example.input.resize((64, 64), Image.BICUBIC)))
    # non-square: 24x12 -> 128x64, then a 64x64 crop
    wide = example.__class__(input=example.input.resize((24, 12)), target=example.target.resize((24, 12)), instruction="x")
    assert paired_transform(wide, 64, torch.Generator(), center_crop=False)[0].shape == (3, 64, 64)
    output = tmp_path / "out"
    args = train_args(trainable_base_dir, data, output, checkpoint_steps=0)
    args[args.index("--resolution") + 1] = "64"
    run_cli(args)
    adapter = load_adapter(str(output))
    assert adapter.training["resolution"] == 64 and all(np.isfinite(t.numpy()).all() for t in adapter.tensors.values())
