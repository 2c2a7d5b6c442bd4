"""Adapter folders: round trips, interop with plain diffusers both ways, refusal of bad input (issue 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from adapterkit.testing import random_custom_diffusion, random_image, random_lora

from adapterkit.adapters import load_adapter, save_adapter
from adapterkit.adapters.bank import AdapterBank
from adapterkit.base import cross_attention_kv_layers, load_base
from adapterkit.errors import AdapterkitError
from adapterkit.inference import run_pipeline

GEN = dict(steps=3, seed=7, output_type="np")


def plain_pipeline(folder):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_edit(pipe, image, instruction):
    generator = torch.Generator("cpu").manual_seed(GEN["seed"])
    return pipe(instruction, image=image, num_inference_steps=GEN["steps"], guidance_scale=7.0,
                image_guidance_scale=1.5, generator=generator, output_type="np").images[0]


def test_save_load_round_trip(tiny_base, tmp_path, method):
    adapter = (random_custom_diffusion(tiny_base, "derain") if method == "custom-diffusion"
               else random_lora(tiny_base, "derain", rank=3, alpha=6.0))
    adapter.instructions = ["derain the image", "remove the rain"]
    save_adapter(adapter, str(tmp_path / "derain"))
    meta = json.loads((tmp_path / "derain" / "adapter.json").read_text())
    assert meta["format"] == 1 and meta["method"] == method and meta["task"] == "derain"
    assert meta["base"]["fingerprint"] == tiny_base.fingerprint
    assert "Load in plain diffusers" in (tmp_path / "derain" / "README.md").read_text()
    loaded = load_adapter(str(tmp_path / "derain"))
    assert loaded.instructions == adapter.instructions and loaded.method == method
    assert loaded.tensors.keys() == adapter.tensors.keys()
    for key, value in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], value)
    if method == "lora":
        assert loaded.options["r"] == 3 and loaded.options["lora_alpha"] == 6.0 and loaded.rank == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp folders left behind


def test_lora_saved_by_adapterkit_loads_in_plain_diffusers_with_the_same_image(tiny_base_dir, tmp_path, image):
    base = load_base(tiny_base_dir)
    adapter = random_lora(base, "derain", rank=4, alpha=8.0, seed=3)  # alpha != r: the scale must survive the file
    save_adapter(adapter, str(tmp_path / "derain"))
    bank = AdapterBank(base)
    bank.add(load_adapter(str(tmp_path / "derain")))
    ours = bank.edit(image, "derain the image", task="derain", **GEN)

    pipe = plain_pipeline(tiny_base_dir)
    theirs_base = plain_edit(pipe, image, "derain the image")
    pipe.load_lora_weights(str(tmp_path / "derain"))
    theirs = plain_edit(pipe, image, "derain the image")
    assert np.abs(ours - theirs_base).max() > 1e-2  # the adapter does change the image
    np.testing.assert_array_equal(ours, theirs)


def write_diffusers_custom_diffusion(unet, folder, seed=0):
    """Write a Custom Diffusion file the way diffusers' train_custom_diffusion.py does (save_attn_procs)."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    processors = {}
    gen = torch.Generator().manual_seed(seed)
    for name in unet.attn_processors:
        is_cross = name.endswith("attn2.processor")
        block = name.rsplit(".processor", 1)[0]
        attn = unet.get_submodule(block)
        proc = CustomDiffusionAttnProcessor(
            train_kv=is_cross, train_q_out=False, hidden_size=attn.to_q.out_features,
            cross_attention_dim=attn.to_k.in_features if is_cross else None,
        )
        if is_cross:
            with torch.no_grad():
                for proj in ("to_k", "to_v"):
                    base_w = getattr(attn, proj).weight
                    new_w = base_w + 0.5 * base_w.std() * torch.randn(base_w.shape, generator=gen)
                    getattr(proc, f"{proj}_custom_diffusion").weight.copy_(new_w)
        processors[name] = proc
    unet.set_attn_processor(processors)
    unet.save_attn_procs(str(folder), safe_serialization=True)


def test_custom_diffusion_file_from_diffusers_loads_and_matches_hand_set_weights(tiny_base_dir, tmp_path, image):
    from safetensors.torch import load_file

    folder = tmp_path / "cd"
    write_diffusers_custom_diffusion(plain_pipeline(tiny_base_dir).unet, folder)
    assert os.listdir(folder) == ["pytorch_custom_diffusion_weights.safetensors"]  # no adapter.json

    adapter = load_adapter(str(folder), task="cartoonize", instructions=["cartoonize the image"])
    assert adapter.method == "custom-diffusion" and adapter.task == "cartoonize"
    bank = AdapterBank(load_base(tiny_base_dir))
    bank.add(adapter)
    ours = bank.edit(image, "cartoonize the image", task="cartoonize", **GEN)

    # Plain diffusers, by hand: copy each file tensor into the matching attn2 to_k / to_v weight.
    pipe = plain_pipeline(tiny_base_dir)
    before = plain_edit(pipe, image, "cartoonize the image")
    modules = dict(pipe.unet.named_modules())
    for key, weight in load_file(str(folder / "pytorch_custom_diffusion_weights.safetensors")).items():
        attn, name = key.split(".processor.")
        modules[f"{attn}.{name.split('_custom_diffusion')[0]}"].weight.data.copy_(weight)
    theirs = plain_edit(pipe, image, "cartoonize the image")
    assert np.abs(theirs - before).max() > 1e-2
    np.testing.assert_array_equal(ours, theirs)


def test_diffusers_9320_load_attn_procs_still_ignores_custom_diffusion_weights(tiny_base_dir, tmp_path, image):
    """compat.py: adapterkit copies K/V itself because load_attn_procs installs nothing without `_pipeline`.

    When this test fails, diffusers#9320 is fixed upstream: the workaround can be revisited.
    """
    folder = tmp_path / "cd"
    write_diffusers_custom_diffusion(plain_pipeline(tiny_base_dir).unet, folder)
    pipe = plain_pipeline(tiny_base_dir)
    before = plain_edit(pipe, image, "x")
    pipe.unet.load_attn_procs(str(folder), weight_name="pytorch_custom_diffusion_weights.safetensors")
    np.testing.assert_array_equal(plain_edit(pipe, image, "x"), before)


def test_legacy_bin_loads_with_weights_only(tiny_base, tmp_path):
    adapter = random_custom_diffusion(tiny_base, "derain")
    save_adapter(adapter, str(tmp_path / "a"))
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "a" / "pytorch_custom_diffusion_weights.safetensors"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(sd, legacy / "pytorch_custom_diffusion_weights.bin")
    loaded = load_adapter(str(legacy), task="derain")
    for key, value in adapter.tensors.items():
        assert torch.equal(loaded.tensors[key], value)


def test_adapter_for_another_base_is_refused_unless_forced(tiny_base, tmp_path):
    from adapterkit.tiny import make_tiny_pipeline
    from adapterkit.base import Base, compute_fingerprint

    other_pipe = make_tiny_pipeline(seed=1)  # same shapes, other weights
    other = Base(pipe=other_pipe, name_or_path="other", fingerprint=compute_fingerprint(other_pipe.unet))
    adapter = random_custom_diffusion(other, "derain")
    with pytest.raises(AdapterkitError, match=f"made for base {other.fingerprint}.*--force"):
        AdapterBank(tiny_base).add(adapter)
    AdapterBank(tiny_base).add(adapter, force=True)  # shapes match: experts may override

    narrow_pipe = make_tiny_pipeline(seed=0, text_dim=16)  # another text width: K/V shapes differ
    narrow = Base(pipe=narrow_pipe, name_or_path="narrow", fingerprint=compute_fingerprint(narrow_pipe.unet))
    first = next(iter(cross_attention_kv_layers(tiny_base.unet)))
    with pytest.raises(AdapterkitError, match=f"adapter layer {first} has shape"):
        AdapterBank(tiny_base).add(random_custom_diffusion(narrow, "x"), force=True)
    with pytest.raises(AdapterkitError, match="maps 16->"):
        AdapterBank(tiny_base).add(random_lora(narrow, "y"), force=True)


def test_lora_on_conv_layers_is_refused_before_training(tiny_base):
    from adapterkit.adapters import lora

    config = lora.make_config(4, targets="to_k,conv1")
    with pytest.raises(AdapterkitError, match=r"down_blocks\.0\.resnets\.0\.conv1 is a Conv2d.*Linear layers only"):
        lora.make_trainable(tiny_base.unet, config)
    assert not any(".lora_" in name for name, _ in tiny_base.unet.named_parameters())  # nothing attached
    assert lora.make_trainable(tiny_base.unet, lora.make_config(4, targets="attn"))  # Linear presets still train
