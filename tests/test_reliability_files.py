"""Hostile and broken files: one-line errors (AdapterkitError -> exit 2), nothing executed, nothing changed (issue 7)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from adapterkit.testing import random_custom_diffusion, random_lora
from PIL import Image
from safetensors.torch import load_file, save_file

from adapterkit.adapters import load_adapter, save_adapter
from adapterkit.adapters.bank import AdapterBank
from adapterkit.errors import AdapterkitError
from adapterkit.inference import open_image

CD_FILE = "pytorch_custom_diffusion_weights.safetensors"


def tree_digest(folder) -> dict:
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


@pytest.fixture
def cd_folder(tiny_base, tmp_path):
    return save_adapter(random_custom_diffusion(tiny_base, "derain"), str(tmp_path / "derain"))


class Payload:
    """Unpickling this would create a marker file: the test proves it never happens."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_a_bin_adapter_never_runs(tiny_base, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"x.attn2.processor.to_k_custom_diffusion.weight": Payload(str(marker))},
               folder / "pytorch_custom_diffusion_weights.bin")
    with pytest.raises(AdapterkitError, match="not a plain tensor checkpoint"):
        load_adapter(str(folder), task="evil")
    assert not marker.exists()


def _rewrite(folder, change):
    path = os.path.join(folder, CD_FILE)
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.update({k: v.to(torch.int32) for k, v in list(sd.items())[:1]}), "must be floating point"),
        (lambda sd: sd.update({k: v.T.contiguous() for k, v in list(sd.items())[:1]}), "has shape"),
        (lambda sd: next(iter(sd.values())).__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda sd: next(iter(sd.values())).__setitem__((0, 0), float("inf")), "NaN or Inf"),
        (lambda sd: sd.pop(next(iter(sd))), "adapter lacks 1 of the base's 12 K/V layers"),
        (lambda sd: sd.update({"nope.attn2.processor.to_k_custom_diffusion.weight": torch.zeros(2, 2)}), "does not exist in this base"),
        (lambda sd: sd.update({"x.attn2.processor.to_q_custom_diffusion.weight": torch.zeros(2, 2)}), "to_q/to_out weight.*--freeze_model crossattn_kv"),
    ],
)
def test_damaged_safetensors_are_refused(tiny_base, cd_folder, change, message):
    _rewrite(cd_folder, change)
    before = tree_digest(cd_folder)
    with pytest.raises(AdapterkitError, match=message) as info:
        AdapterBank(tiny_base).add(load_adapter(cd_folder))
    assert "\n" not in str(info.value)
    assert tree_digest(cd_folder) == before


def test_truncated_and_empty_safetensors_are_refused(cd_folder):
    path = os.path.join(cd_folder, CD_FILE)
    data = open(path, "rb").read()
    for damaged in (data[: len(data) // 2], b"", b"\x00" * 8):
        open(path, "wb").write(damaged)
        with pytest.raises(AdapterkitError, match="not a readable safetensors file"):
            load_adapter(cd_folder)


def test_lora_with_missing_or_extra_keys_is_refused(tiny_base, tmp_path):
    folder = save_adapter(random_lora(tiny_base, "derain"), str(tmp_path / "lora"))
    path = os.path.join(folder, "pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    sd = load_file(path)
    first_up = next(k for k in sd if k.endswith("lora.up.weight"))
    save_file({k: v for k, v in sd.items() if k != first_up}, path, metadata=metadata)
    with pytest.raises(AdapterkitError, match="lacks its lora_A or lora_B"):
        AdapterBank(tiny_base).add(load_adapter(folder))
    save_file({**sd, "unet.down_blocks.9.attn2.to_k.lora.down.weight": torch.zeros(4, 32),
               "unet.down_blocks.9.attn2.to_k.lora.up.weight": torch.zeros(32, 4)}, path, metadata=metadata)
    with pytest.raises(AdapterkitError, match="does not exist in this base"):
        AdapterBank(tiny_base).add(load_adapter(folder))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format=2), "has format 2; this adapterkit reads format 1"),
        (lambda m: m.pop("format"), "has format None"),
        (lambda m: m.update(instructions="derain the image"), "field 'instructions' must be a list"),
        (lambda m: m.update(instructions=[1, 2]), "every entry of 'instructions' must be a string"),
        (lambda m: m.update(task=7), "field 'task' must be a str"),
        (lambda m: m.pop("method"), "lacks the field 'method'"),
        (lambda m: m.update(base="tiny"), "field 'base' must be an object"),
    ],
)
def test_bad_adapter_json_is_refused(cd_folder, edit, message):
    path = os.path.join(cd_folder, "adapter.json")
    meta = json.loads(open(path).read())
    edit(meta)
    open(path, "w").write(json.dumps(meta))
    with pytest.raises(AdapterkitError, match=message):
        load_adapter(cd_folder)
    open(path, "w").write("{not json")
    with pytest.raises(AdapterkitError, match="is not valid JSON"):
        load_adapter(cd_folder)


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_images_of_every_mode_are_converted_not_refused(tmp_path):
    rgb = Image.fromarray((np.random.RandomState(0).rand(20, 30, 3) * 255).astype(np.uint8))
    cases = {
        "gray.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "gray16.png": Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)),
    }
    for name, img in cases.items():
        out = open_image(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (30, 20), name
    # 16-bit is rescaled from the 0..65535 range, not clipped: the brightest pixel (59900) becomes 233
    assert np.asarray(open_image(str(tmp_path / "gray16.png"))).max() == round(59900 / 65535 * 255)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_as_diffusers_load_image_does(tmp_path, orientation):
    """Session 22: a phone's portrait photo, stored sideways with an EXIF orientation tag, was edited (and trained on,
    and served) sideways; diffusers' load_image and datasets' Image feature turn it upright first."""
    from diffusers.utils import load_image

    from adapterkit.data import load_edit_dataset

    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:10, :20] = 255  # a white block in one corner tells the orientations apart
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    ours, theirs = open_image(str(path)), load_image(str(path))
    assert ours.size == theirs.size == ((40, 60) if orientation in (6, 8) else (60, 40))
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"input_image_file_name": "photo.jpg", "edited_image_file_name":
                                                         "photo.jpg", "edit_prompt": "x"}) + "\n")
    assert np.array_equal(np.asarray(load_edit_dataset(str(tmp_path))[0].input), np.asarray(theirs))


def test_heic_photos_read_with_pillow_heif_and_a_fix_named_without_it(tmp_path, monkeypatch):
    """Session 23: an iPhone photo (HEIC, their default format) got "cannot identify image file". With pillow-heif
    installed (the [heic] and [test] extras) it reads like any photo, in a dataset too; without it the one-line error
    names the plugin and the JPEG export."""
    pillow_heif = pytest.importorskip("pillow_heif")  # in the [test] extra: CI runs this
    from adapterkit import inference
    from adapterkit.data import load_edit_dataset

    pillow_heif.register_heif_opener()
    pixels = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.heic")
    expected = np.asarray(Image.open(tmp_path / "photo.heic").convert("RGB"))  # HEIC is lossy: compare to its decode
    assert np.array_equal(np.asarray(open_image(str(tmp_path / "photo.heic"))), expected)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"input_image_file_name": "photo.heic", "edited_image_file_name":
                                                         "photo.heic", "edit_prompt": "x"}) + "\n")
    assert np.array_equal(np.asarray(load_edit_dataset(str(tmp_path))[0].input), expected)
    header = open(tmp_path / "photo.heic", "rb").read(16)
    (tmp_path / "cut.heic").write_bytes(header + b"\0" * 64)  # a HEIC file Pillow cannot open
    monkeypatch.setattr(inference, "heif_support", lambda: False)  # as without the plugin
    with pytest.raises(AdapterkitError) as info:
        open_image(str(tmp_path / "cut.heic"))
    assert str(info.value) == (f"{tmp_path / 'cut.heic'} is a HEIC photo (iPhones' default format), which Pillow reads only "
                               "with the pillow-heif plugin: pip install pillow-heif (or adapterkit[heic]), or export the "
                               "photo as JPEG")


def test_broken_and_oversized_images_give_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    good = _save(Image.new("RGB", (64, 64), "red"), tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes(open(good, "rb").read()[:40])
    for name in ("empty.png", "truncated.png", "missing.png"):
        with pytest.raises(AdapterkitError) as info:
            open_image(str(tmp_path / name))
        assert "\n" not in str(info.value)
    # A decompression bomb: a tiny file that declares 100k x 100k pixels (issue 19: written from its header alone,
    # never built in memory; building it took 45 s and 10 GB).
    bomb = write_png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert os.path.getsize(bomb) < 1_000
    with pytest.raises(AdapterkitError, match="too large"):
        open_image(str(bomb))


def write_png_header_only(path, width: int, height: int) -> str:
    """A valid PNG signature and IHDR claiming width x height (1-bit gray), one tiny IDAT, IEND: what a
    decompression bomb's header looks like, without its pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return str(path)


BOMB_SCRIPT = """
{writer}
from adapterkit.errors import AdapterkitError
from adapterkit.inference import open_image
try:
    open_image(write_png_header_only({path!r}, 100_000, 100_000))
except AdapterkitError as e:
    print("ERROR", e)
# VmHWM: this process image's own peak (ru_maxrss would carry over the forking pytest process's peak)
print("PEAK_KB", next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from Linux's /proc")
def test_decompression_bomb_is_refused_from_its_header_in_little_memory(tmp_path):
    """Issue 19: the refusal reads the header only; the whole check (Python, Pillow, adapterkit's image reader, no torch) peaks under 100 MB."""
    import inspect
    import subprocess
    import sys

    script = BOMB_SCRIPT.format(writer=inspect.getsource(write_png_header_only), path=str(tmp_path / "bomb.png"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "ERROR image" in done.stdout and "too large" in done.stdout
    peak_mb = int(done.stdout.split("PEAK_KB")[1]) / 1024
    assert peak_mb < 100, f"peak RSS {peak_mb:.0f} MB"


def test_output_under_a_file_gives_a_clear_error(tiny_base, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(AdapterkitError, match="cannot create output folder"):
        save_adapter(random_custom_diffusion(tiny_base, "derain"), str(tmp_path / "file.txt" / "derain"))
    assert (tmp_path / "file.txt").read_text() == "x"


FULL_DISK_SCRIPT = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from adapterkit.testing import random_custom_diffusion
from adapterkit.adapters import save_adapter
from adapterkit.base import load_base
from adapterkit.errors import AdapterkitError
adapter = random_custom_diffusion(load_base({base!r}), "derain", seed=2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the weight file needs ~100 kB: the "disk" fills
try:
    save_adapter(adapter, {target!r})
except AdapterkitError as e:
    print("ERROR", e)
"""


def test_full_disk_gives_a_clear_error_and_keeps_the_old_adapter(tiny_base, tiny_base_dir, tmp_path):
    import subprocess
    import sys

    target = tmp_path / "derain"
    save_adapter(random_custom_diffusion(tiny_base, "derain", seed=1), str(target))
    before = tree_digest(tmp_path)
    script = FULL_DISK_SCRIPT.format(tests=os.path.dirname(__file__), base=tiny_base_dir, target=str(target))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ERROR cannot write") and "free space" in proc.stdout
    assert tree_digest(tmp_path) == before  # old adapter intact, no temp folder left


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root in a container usually may); skip where mounting is not permitted."""
    import subprocess

    point = tmp_path / "mnt"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_location_gives_a_clear_error_and_changes_nothing(tiny_base, tmpfs):
    import subprocess

    target = tmpfs / "derain"
    save_adapter(random_custom_diffusion(tiny_base, "derain", seed=1), str(target))
    before = tree_digest(tmpfs)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    with pytest.raises(AdapterkitError, match="not writable"):
        save_adapter(random_custom_diffusion(tiny_base, "derain", seed=2), str(target))
    assert tree_digest(tmpfs) == before


def test_full_tmpfs_gives_a_clear_error_and_keeps_the_old_adapter(tiny_base, tmpfs):
    target = tmpfs / "derain"
    save_adapter(random_custom_diffusion(tiny_base, "derain", seed=1), str(target))  # ~100 kB of 256 kB
    before = tree_digest(tmpfs)
    with pytest.raises(AdapterkitError, match="cannot write .*No space left"):
        for seed in range(2, 6):  # the second copy no longer fits beside the first
            save_adapter(random_custom_diffusion(tiny_base, "derain", seed=seed), str(tmpfs / f"copy{seed}"))
    assert {k: v for k, v in tree_digest(tmpfs).items() if k.startswith("derain")} == before
    assert not [p for p in os.listdir(tmpfs) if p.startswith(".")]  # no temp folders left behind


@pytest.mark.parametrize("path", ["../outside.png", "in/../../outside.png", "/etc/passwd"])
def test_dataset_paths_escaping_the_folder_are_refused(tmp_path, path):
    from adapterkit.data import load_edit_dataset

    folder = tmp_path / "data"
    (folder / "in").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "in" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = [{"input_image_file_name": "in/a.png", "edited_image_file_name": "in/a.png", "edit_prompt": "derain"},
            {"input_image_file_name": "in/a.png", "edited_image_file_name": path, "edit_prompt": "derain"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(AdapterkitError, match="line 2: edited_image_file_name .* points outside the dataset folder"):
        load_edit_dataset(str(folder))


def test_atomic_writes_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import stat

    from adapterkit import fileio

    old = os.umask(0o022)
    try:
        fileio.write_json(str(tmp_path / "report.json"), {"a": 1})
        with fileio.atomic_folder(str(tmp_path / "adapter")) as tmp:
            open(os.path.join(tmp, "weights.safetensors"), "wb").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode) == 0o644  # readable by a web server serving reports
    assert stat.S_IMODE(os.stat(tmp_path / "adapter").st_mode) == 0o755


def test_merge_and_import_never_replace_another_adapter_silently(tiny_base, tiny_base_dir, tmp_path):
    """Session 21: `merge A B --output A` replaced source A with the merge, and `import X --output Y` replaced the
    adapter in Y, without a word. Now both are one line and exit 2, the folder untouched; --overwrite replaces it;
    rerunning the same merge replaces its own output."""
    from click.testing import CliRunner

    from adapterkit.cli import main

    derain = save_adapter(random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain it"]), str(tmp_path / "derain"))
    cartoon = save_adapter(random_lora(tiny_base, "cartoonize", rank=2, seed=2, instructions=["cartoon it"]), str(tmp_path / "cartoonize"))
    before = tree_digest(derain)

    def run(*args):
        result = CliRunner().invoke(main, list(args))
        return result.exit_code, result.output

    code, out = run("merge", derain, cartoon, "--base", tiny_base_dir, "--method", "linear", "--output", derain)
    assert code == 2 and "already holds the custom-diffusion adapter 'derain'; writing the custom-diffusion adapter " \
                         "'cartoonize+derain' there would replace it" in out and "--overwrite" in out, out
    code, out = run("import", cartoon, "--base", tiny_base_dir, "--task", "cartoonize", "--instruction", "x", "--output", derain)
    assert code == 2 and "already holds the custom-diffusion adapter 'derain'" in out, out
    assert tree_digest(derain) == before
    merged = str(tmp_path / "merged")
    for _ in range(2):  # the same merge again replaces its own output
        code, out = run("merge", derain, cartoon, "--base", tiny_base_dir, "--method", "linear", "--output", merged)
        assert code == 0, out
    (tmp_path / "merged" / "samples").mkdir()  # files added beside an adapter went with it on a rerun (session 22)
    code, out = run("merge", derain, cartoon, "--base", tiny_base_dir, "--method", "linear", "--output", merged)
    assert code == 2 and "holds files besides its custom-diffusion adapter 'cartoonize+derain' (samples)" in out, out
    assert (tmp_path / "merged" / "samples").is_dir()
    code, out = run("import", cartoon, "--base", tiny_base_dir, "--task", "cartoonize", "--instruction", "x", "--output",
                    derain, "--overwrite")
    assert code == 0 and load_adapter(derain).task == "cartoonize", out


def test_train_and_demo_data_never_delete_a_folder_of_another_kind(trainable_base_dir, tiny_base, tmp_path):
    """Session 21: `train --data D --output D` published the adapter over the dataset (deleted), and `demo-data
    --output adapters/derain` replaced the adapter with a dataset. Both are now one line and exit 2, nothing touched."""
    from click.testing import CliRunner

    from adapterkit.cli import main
    from adapterkit.testing import make_edit_dataset

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        return result.exit_code, result.output

    data = make_edit_dataset(tmp_path / "data", 4, size=32)
    before = tree_digest(data)
    code, out = run("train", "--base", trainable_base_dir, "--data", data, "--method", "lora", "--task", "derain",
                    "--output", data, "--resolution", "32", "--steps", "1", "--batch-size", "1", "--validation-steps", "0",
                    "--checkpoint-steps", "0", "--log-with", "none", "--quiet")
    assert code == 2 and "holds files that are not an adapter" in out and "would delete them" in out, out
    assert tree_digest(data) == before
    adapter = save_adapter(random_custom_diffusion(tiny_base, "derain"), str(tmp_path / "adapter"))
    before = tree_digest(adapter)
    code, out = run("demo-data", "--task", "derain", "--rows", "2", "--output", adapter)
    assert code == 2 and "not a demo-data dataset (README.md, adapter.json" in out, out
    assert tree_digest(adapter) == before
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "ds", tmp_path / "ds"):  # empty, new, an earlier dataset: written
        code, out = run("demo-data", "--task", "derain", "--rows", "2", "--output", target, "--quiet")
        assert code == 0, out
    save_adapter(random_custom_diffusion(tiny_base, "derain"), str(tmp_path / "ds" / "adapter"))  # added to a dataset
    code, out = run("demo-data", "--task", "derain", "--rows", "2", "--output", tmp_path / "ds", "--quiet")
    assert code == 2 and "not a demo-data dataset (adapter)" in out and (tmp_path / "ds" / "adapter" / "adapter.json").is_file(), out


def _text_to_image_copy(tiny_base_dir, folder) -> str:
    """An SD-shaped (4-channel UNet) text-to-image copy of the tiny base: what convert-base reads."""
    import shutil

    shutil.copytree(tiny_base_dir, folder)
    config_path = os.path.join(folder, "unet", "config.json")
    config = json.loads(open(config_path).read())
    config["in_channels"] = 4
    open(config_path, "w").write(json.dumps(config))
    weights = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :4].contiguous()
    save_file(tensors, weights)
    os.remove(os.path.join(folder, "adapterkit_base.json"))
    return str(folder)


def test_pipeline_writers_never_replace_another_folder_silently(tiny_base, tiny_base_dir, tmp_path):
    """Session 22: convert-base, make-tiny-base and merge --fuse --output-pipeline replaced whatever their output folder
    held: an adapter, another pipeline, even the pipeline they read (`convert-base SD --output SD` lost the
    text-to-image model; `--output-pipeline <the --base>` changed the base every adapter was made for). Now one line,
    exit 2, before any work, the folder untouched; a rerun replaces its own output; --overwrite replaces anything."""
    from click.testing import CliRunner

    from adapterkit.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        return result.exit_code, result.output

    sd = _text_to_image_copy(tiny_base_dir, tmp_path / "sd")
    adapter = save_adapter(random_custom_diffusion(tiny_base, "derain", instructions=["derain it"]), str(tmp_path / "derain"))
    other = save_adapter(random_custom_diffusion(tiny_base, "cartoonize", seed=1, instructions=["cartoon it"]), str(tmp_path / "cartoon"))
    tiny = str(tmp_path / "tiny")
    assert run("make-tiny-base", "--output", tiny)[0] == 0
    kept = {folder: tree_digest(folder) for folder in (sd, adapter, tiny, tiny_base_dir)}
    fuse = ("merge", adapter, other, "--base", tiny_base_dir, "--method", "linear", "--output", tmp_path / "m",
            "--output-pipeline")  # without --fuse, which it implies
    refusals = [
        (("convert-base", sd, "--output", sd), "sd is the pipeline this command reads; writing the converted pipeline there would replace it"),
        (("convert-base", sd, "--output", adapter), "holds files that are not a pipeline (README.md, adapter.json"),
        (("convert-base", sd, "--output", tiny), "already holds a diffusers pipeline (made by adapterkit make-tiny-base)"),
        (("make-tiny-base", "--output", adapter), "writing the tiny pipeline there would delete them"),
        (("make-tiny-base", "--output", sd), "already holds a diffusers pipeline; writing the tiny pipeline"),
        ((*fuse, tiny_base_dir), "is the pipeline this command reads; writing the fused pipeline there would replace it: "
                                 "choose another --output-pipeline, or pass --overwrite"),
        ((*fuse, adapter), "writing the fused pipeline there would delete them"),
    ]
    for args, message in refusals:
        code, out = run(*args)
        assert code == 2 and message in out and "Traceback" not in out, (args, out)
        assert not os.path.exists(tmp_path / "m"), "the merge refused its pipeline folder before writing anything"
    assert {folder: tree_digest(folder) for folder in kept} == kept
    converted, fused = tmp_path / "converted", tmp_path / "fused"
    for args in [("convert-base", sd, "--output", converted)] * 2 + [(*fuse, fused)] * 2 + [("make-tiny-base", "--output", tiny, "--seed", 1)]:
        code, out = run(*args)  # new, then the same command again over its own output
        assert code == 0, (args, out)
    assert json.loads((converted / "adapterkit_base.json").read_text())["made_by"] == "adapterkit convert-base"
    code, out = run("convert-base", sd, "--output", sd, "--overwrite")
    assert code == 0 and json.loads(open(os.path.join(sd, "unet", "config.json")).read())["in_channels"] == 8, out
    import shutil

    own = str(tmp_path / "own-base")  # --overwrite fuses into the --base itself (checked once, before the solve)
    shutil.copytree(tiny_base_dir, own)
    code, out = run("merge", adapter, other, "--base", own, "--method", "linear", "--output", tmp_path / "m2", "--fuse",
                    "--output-pipeline", own, "--overwrite")
    assert code == 0 and json.loads(open(os.path.join(own, "adapterkit_base.json")).read())["made_by"] == "adapterkit merge --fuse", out
