"""Adopting adapters written by diffusers' own training scripts, and the model card reproducing `adapterkit edit`
in plain diffusers (issue 17). Every foreign folder is built with diffusers and peft as the scripts build it
(tests/diffusers_scripts.py), never by hand."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers_scripts import write_custom_diffusion, write_lora
from PIL import Image
from safetensors.torch import load_file

from adapterkit.adapters import load_adapter, save_adapter
from adapterkit.adapters.bank import AdapterBank
from adapterkit.base import load_base
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.testing import random_custom_diffusion, random_image, random_lora

GEN = dict(steps=3, seed=7, output_type="np")
CD_FILE = "pytorch_custom_diffusion_weights.safetensors"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def plain_pipeline(folder):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_edit(pipe, image, instruction):
    generator = torch.Generator("cpu").manual_seed(GEN["seed"])
    return pipe(instruction, image=image, num_inference_steps=GEN["steps"], guidance_scale=7.0,
                image_guidance_scale=1.5, generator=generator, output_type="np").images[0]


def copy_kv(pipe, folder, weight_name=CD_FILE):
    """diffusers' way for K/V (load_attn_procs ignores them: diffusers#9320): copy each file tensor into its layer."""
    sd = load_file(os.path.join(folder, weight_name)) if weight_name.endswith(".safetensors") else torch.load(
        os.path.join(folder, weight_name), weights_only=True)
    modules = dict(pipe.unet.named_modules())
    for key, weight in sd.items():
        if isinstance(weight, torch.Tensor):
            attn, name = key.split(".processor.")
            modules[f"{attn}.{name.split('_custom_diffusion')[0]}"].weight.data.copy_(weight)


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


# ------------------------------------------------------------------------------------------- 17.2 the .bin file
def test_issue17_custom_diffusion_bin_as_diffusers_writes_it_loads(tiny_base_dir, tmp_path):
    """save_attn_procs(safe_serialization=False) stores {} for every attn1 processor; it loads, weights_only."""
    write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "bin", seed=3, safe=False)
    write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "st", seed=3, safe=True)
    raw = torch.load(tmp_path / "bin" / "pytorch_custom_diffusion_weights.bin", weights_only=True)
    assert any(isinstance(v, dict) and not v for v in raw.values())  # diffusers' placeholders are there
    from_bin = load_adapter(str(tmp_path / "bin"), task="cartoonize")
    from_st = load_adapter(str(tmp_path / "st"), task="cartoonize")
    assert from_bin.tensors.keys() == from_st.tensors.keys() and len(from_bin.tensors) == 12
    for key, value in from_st.tensors.items():
        assert torch.equal(from_bin.tensors[key], value)
    AdapterBank(load_base(tiny_base_dir)).add(from_bin)  # every layer matches the base


def test_issue17_unknown_weight_file_in_the_folder_is_refused_not_ignored(tiny_base_dir, tmp_path):
    folder = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "cd", safe=False)
    torch.save({"state": torch.zeros(3), "step": torch.ones(1)}, os.path.join(folder, "optimizer.bin"))
    with pytest.raises(AdapterkitError, match=r"optimizer\.bin is neither the adapter's weight file nor a modifier-token"):
        load_adapter(folder, task="x")


# ------------------------------------------------------------------------------ 17.4 the flag the script has
def test_issue17_q_out_weights_error_names_the_scripts_real_flag(tiny_base_dir, tmp_path):
    write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "qout", freeze_model="crossattn")
    with pytest.raises(AdapterkitError) as info:
        load_adapter(str(tmp_path / "qout"), task="x")
    message = str(info.value)
    assert "--freeze_model crossattn" in message and "--freeze_model crossattn_kv (the default)" in message
    assert "train_q_out" not in message and "\n" not in message


# ----------------------------------------------------------------------------------- 17.3 the modifier token
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_issue17_modifier_token_edit_equals_diffusers_load_textual_inversion(tiny_base_dir, tmp_path, image, safe):
    folder = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "cd", seed=1, safe=safe, modifier_token="<new1>")
    token_file = "<new1>.safetensors" if safe else "<new1>.bin"
    assert token_file in os.listdir(folder)
    adapter = load_adapter(folder, task="cartoonize", instructions=["<new1> cartoonize the image"])
    assert list(adapter.tokens) == ["<new1>"] and adapter.tokens["<new1>"].shape == (32,)
    bank = AdapterBank(load_base(tiny_base_dir))
    base_out = bank.edit(image, "cartoonize the image", task=None, **GEN)
    bank.add(adapter)
    ours = bank.edit(image, "<new1> cartoonize the image", task="cartoonize", **GEN)

    pipe = plain_pipeline(tiny_base_dir)  # diffusers' way: K/V + load_textual_inversion, as the script's own test
    copy_kv(pipe, folder, CD_FILE if safe else "pytorch_custom_diffusion_weights.bin")
    pipe.load_textual_inversion(folder, weight_name=token_file)
    theirs = plain_edit(pipe, image, "<new1> cartoonize the image")
    np.testing.assert_array_equal(ours, theirs)

    kv_only = plain_pipeline(tiny_base_dir)  # without the token the edit is another one: it is not ignored
    copy_kv(kv_only, folder, CD_FILE if safe else "pytorch_custom_diffusion_weights.bin")
    assert np.abs(plain_edit(kv_only, image, "<new1> cartoonize the image") - ours).max() > 1e-3
    bank.deactivate()  # the base again: the token's row back at rest, every other word as before
    np.testing.assert_array_equal(bank.edit(image, "cartoonize the image", task=None, **GEN), base_out)
    row = bank.pipe.tokenizer.convert_tokens_to_ids("<new1>")
    assert not torch.equal(bank.pipe.text_encoder.get_input_embeddings().weight[row], adapter.tokens["<new1>"])


def test_issue17_two_adapters_owning_new1_each_edit_with_their_own_embedding(tiny_base_dir, tmp_path, image):
    folders = {t: write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / t, seed=s, modifier_token="<new1>")
               for t, s in (("cat", 1), ("dog", 2))}
    bank = AdapterBank(load_base(tiny_base_dir))
    for task, folder in folders.items():
        bank.add(load_adapter(folder, task=task, instructions=[f"<new1> {task}"]))
    for task in ("cat", "dog", "cat"):
        ours = bank.edit(image, "<new1> make it so", task=task, **GEN)
        pipe = plain_pipeline(tiny_base_dir)
        copy_kv(pipe, folders[task])
        pipe.load_textual_inversion(folders[task], weight_name="<new1>.safetensors")
        np.testing.assert_array_equal(ours, plain_edit(pipe, image, "<new1> make it so"))


def test_issue17_merge_holds_the_sources_tokens_and_refuses_a_clash(tiny_base_dir, tmp_path):
    from adapterkit.merge import merge

    a = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "a", seed=1, modifier_token="<new1>")
    b = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "b", seed=2, modifier_token="<new2>")
    clash = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "c", seed=3, modifier_token="<new1>")
    base = load_base(tiny_base_dir)
    sources = [f"{a}::task=cat::instruction=<new1> cat", f"{b}::task=dog::instruction=<new2> dog"]
    result = merge(sources, base, method="lsq-soft", output=str(tmp_path / "merged"), output_pipeline=str(tmp_path / "fused"), quiet=True)
    merged = load_adapter(str(tmp_path / "merged"))
    fused = plain_pipeline(str(tmp_path / "fused"))  # --fuse: the tokens are in the fused tokenizer and text encoder
    for token, folder in (("<new1>", a), ("<new2>", b)):
        row = fused.tokenizer.convert_tokens_to_ids(token)
        assert token in fused.tokenizer.get_vocab()
        assert torch.equal(fused.text_encoder.get_input_embeddings().weight[row], load_adapter(folder).tokens[token])
    assert sorted(merged.tokens) == ["<new1>", "<new2>"]
    assert torch.equal(merged.tokens["<new2>"], load_adapter(b).tokens["<new2>"])
    assert json.loads((tmp_path / "merged" / "adapter.json").read_text())["tokens"] == ["<new1>", "<new2>"]
    # The targets are the tokens' own features: with the tokens dropped the same merge gives other K/V.
    plain = [load_adapter(s) for s in sources]
    for adapter in plain:
        adapter.tokens = {}
    without = merge(plain, base, method="lsq-soft", quiet=True)
    first = next(iter(without.adapter.tensors))
    assert (result.adapter.tensors[first] - without.adapter.tensors[first]).abs().max() > 1e-4
    with pytest.raises(AdapterkitError, match="both own modifier token '<new1>' with different embeddings"):
        merge([sources[0], f"{clash}::task=cow::instruction=<new1> cow"], base, method="lsq-soft", quiet=True)


def test_issue17_token_of_another_text_width_is_refused(tiny_base_dir, tmp_path):
    folder = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "cd", modifier_token="<new1>")
    from safetensors.torch import save_file

    save_file({"<new1>": torch.zeros(768)}, os.path.join(folder, "<new1>.safetensors"))
    with pytest.raises(AdapterkitError, match="modifier token '<new1>' has width 768 but the base's text encoder has 32"):
        AdapterBank(load_base(tiny_base_dir)).add(load_adapter(folder, task="x"))


# ------------------------------------------------------------------- 17.1 adopting from the CLI, per-adapter specs
def test_issue17_import_then_edit_routes_between_two_foreign_folders(tiny_base_dir, tmp_path, image):
    lora_dir = write_lora(plain_pipeline(tiny_base_dir), tmp_path / "lora-out", seed=4)
    cd_dir = write_custom_diffusion(plain_pipeline(tiny_base_dir), tmp_path / "cd-out", seed=5)
    image_path = tmp_path / "in.png"
    image.save(image_path)
    code, out = run_cli("import", lora_dir, "--base", tiny_base_dir, "--task", "derain", "--instruction", "derain the image",
                        "--instruction", "remove the rain", "--output", tmp_path / "derain")
    assert code == 0, out
    assert "lora adapter 'derain'" in out
    code, out = run_cli("import", cd_dir, "--base", tiny_base_dir, "--task", "cartoonize", "--instruction", "cartoonize the image",
                        "--output", tmp_path / "cartoonize")
    assert code == 0, out
    meta = json.loads((tmp_path / "derain" / "adapter.json").read_text())
    assert meta["task"] == "derain" and meta["instructions"] == ["derain the image", "remove the rain"]
    assert meta["base"]["fingerprint"] == load_base(tiny_base_dir).fingerprint and meta["imported"]["from"] == lora_dir
    assert "Load in plain diffusers" in (tmp_path / "derain" / "README.md").read_text()
    assert sorted(os.listdir(cd_dir)) == [CD_FILE]  # the source is left as it was

    flags = ["--steps", 2, "--seed", 3]
    outs = {}
    for name, adapters in (("both", ["derain", "cartoonize"]), ("one", ["cartoonize"])):
        args = [a for d in adapters for a in ("--adapter", tmp_path / d)]
        code, out = run_cli("edit", "--base", tiny_base_dir, *args, image_path, "--instruction", "cartoonize the image",
                            "--output", tmp_path / f"{name}.png", *flags)
        assert code == 0, out
        outs[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    np.testing.assert_array_equal(outs["both"], outs["one"])  # routed to cartoonize, not to the base

    # The same without importing: per-adapter task and instructions in the --adapter value.
    code, out = run_cli("edit", "--base", tiny_base_dir, "--adapter", f"{lora_dir}::task=derain::instruction=derain the image",
                        "--adapter", f"{cd_dir}::task=cartoonize::instruction=cartoonize the image", image_path,
                        "--instruction", "cartoonize the image", "--output", tmp_path / "spec.png", *flags)
    assert code == 0, out
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "spec.png")), outs["one"])
    # Bare foreign folders cannot be routed to: refused with the fix, not sent to the base.
    code, out = run_cli("edit", "--base", tiny_base_dir, "--adapter", lora_dir, "--adapter", cd_dir, image_path,
                        "--instruction", "cartoonize the image", "--output", tmp_path / "bare.png", *flags)
    assert code == 2 and "stores no instructions" in out and "::instruction=" in out and not (tmp_path / "bare.png").exists()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(image_path), "instruction": "cartoonize the image"}) + "\n")
    code, out = run_cli("edit", "--base", tiny_base_dir, "--adapter", cd_dir, "--jobs", jobs, "--output", tmp_path / "jobs-out")
    assert code == 2 and "stores no instructions" in out
    code, out = run_cli("merge", lora_dir, cd_dir, "--base", tiny_base_dir, "--method", "lsq-soft", "--as-lora",
                        "--output", tmp_path / "bare-merge", "--quiet")
    assert code == 2 and "store no instructions" in out and "adapterkit import" in out
    code, out = run_cli("merge", f"{lora_dir}::task=derain::instruction=derain the image",
                        f"{cd_dir}::task=cartoonize::instruction=cartoonize the image", "--base", tiny_base_dir,
                        "--method", "lsq-soft", "--as-lora", "--output", tmp_path / "merged", "--quiet")
    assert code == 0, out
    assert json.loads((tmp_path / "merged" / "adapter.json").read_text())["task"] == "cartoonize+derain"


def test_issue17_import_checks_the_weights_against_the_base(tiny_base_dir, tmp_path):
    from adapterkit.tiny import make_tiny_pipeline

    narrow = str(tmp_path / "narrow")
    make_tiny_pipeline(seed=0, text_dim=16).save_pretrained(narrow)
    lora_dir = write_lora(plain_pipeline(narrow), tmp_path / "lora-out")
    code, out = run_cli("import", lora_dir, "--base", tiny_base_dir, "--task", "x", "--instruction", "x it", "--output", tmp_path / "x")
    assert code == 2 and "maps 16->" in out and not (tmp_path / "x").exists()
    code, out = run_cli("import", lora_dir, "--base", narrow, "--task", "x", "--output", tmp_path / "x")
    assert code == 2 and "--instruction" in out
    code, out = run_cli("import", lora_dir, "--base", narrow, "--task", "x", "--instruction", "x it", "--output", lora_dir)
    assert code == 2 and "is the source folder" in out
    with pytest.raises(AdapterkitError, match="is not task=NAME or instruction=TEXT"):
        load_adapter(f"{lora_dir}::name=x")


# -------------------------------------------------------------------------------------- 17.6 file modes
def test_issue17_weight_files_are_written_0644_like_the_rest(tiny_base, tmp_path, method):
    old = os.umask(0o022)
    try:
        adapter = random_custom_diffusion(tiny_base, "derain") if method == "custom-diffusion" else random_lora(tiny_base, "derain")
        adapter.tokens = {"<new1>": torch.randn(32)}
        folder = save_adapter(adapter, str(tmp_path / "derain"))
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) for name in os.listdir(folder)}
    assert len(modes) == 4 and set(modes.values()) == {0o644}, modes


# ------------------------------------------------------------------- 17.5 the model card's code, run as written
def _card_code(folder) -> tuple[str, str]:
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    python = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    bash = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip()
    return python, bash


@pytest.mark.parametrize("kind", ["custom-diffusion+token on builtin:tiny", "lora on a folder"])
def test_issue17_model_card_code_reproduces_adapterkit_edit(tiny_base_dir, tmp_path, kind, monkeypatch):
    if kind.startswith("custom"):
        base_name, source = "builtin:tiny", tmp_path / "source"
        from adapterkit.base import builtin_tiny_path

        write_custom_diffusion(plain_pipeline(builtin_tiny_path()), source, seed=2, modifier_token="<new1>", strength=0.3)
        instruction = "<new1> derain the image"
    else:
        base_name, source = tiny_base_dir, write_lora(plain_pipeline(tiny_base_dir), tmp_path / "source", seed=2)
        instruction = "derain the image"
    code, out = run_cli("import", source, "--base", base_name, "--task", "derain", "--instruction", instruction, "--output", tmp_path / "derain")
    assert code == 0, out
    folder = tmp_path / "derain"
    python, bash = _card_code(folder)
    assert "builtin:" not in python.replace("# builtin:", "")  # plain diffusers gets a folder, never a built-in name
    assert "import adapterkit" not in python and "from adapterkit" not in python.split("print(")[0].split("# Elsewhere")[0]
    random_image(1, 64).save(folder / "input.png")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", python], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = np.asarray(Image.open(folder / "edited.png"))
    (folder / "edited.png").unlink()

    argv = shlex.split(bash)
    assert argv[0] == "adapterkit"
    monkeypatch.chdir(folder)
    code, out = run_cli(*argv[1:])
    assert code == 0, out
    ours = np.asarray(Image.open(folder / "edited.png"))
    np.testing.assert_array_equal(ours, theirs)
    assert np.abs(ours.astype(int) - np.asarray(Image.open(folder / "input.png")).astype(int)).max() > 0


def test_issue17_readme_line_count_of_the_custom_diffusion_card_is_true():
    from adapterkit.adapters import custom_diffusion

    _what, load = custom_diffusion.card({}, None)
    code_lines = [line for line in load.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    words = {4: "four", 5: "five", 6: "six", 7: "seven"}
    assert f"the {words[len(code_lines)]} lines" in readme.split("## Loading adapters in plain diffusers")[1].split("## CLI")[0]
