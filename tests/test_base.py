"""Base loading, SD1.5 conversion and fingerprints (issue 2)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adapterkit.base import compute_fingerprint, convert_sd15_to_ip2p, cross_attention_kv_layers, load_base
from adapterkit.errors import AdapterkitError


def test_builtin_tiny_random_matches_saved_folder(tiny_base_dir):
    saved = load_base(tiny_base_dir)
    built = load_base("builtin:tiny-random")
    assert saved.fingerprint == built.fingerprint
    assert saved.resolution == 64 and saved.unet.config.in_channels == 8
    assert len(cross_attention_kv_layers(saved.unet)) == 12  # 6 transformer blocks x (to_k, to_v)


def test_fingerprint_tracks_kv_weights_but_not_dtype(tiny_base):
    fp = tiny_base.fingerprint
    assert len(fp) == 16 and fp == compute_fingerprint(tiny_base.unet)
    half = compute_fingerprint(tiny_base.unet.to(torch.float16))
    tiny_base.unet.to(torch.float32)
    assert half == fp
    layer = next(iter(cross_attention_kv_layers(tiny_base.unet).values()))
    with torch.no_grad():
        layer.weight[0, 0] += 0.5
    assert compute_fingerprint(tiny_base.unet) != fp


def test_convert_sd15_keeps_text_to_image_behaviour_and_copies_bias(tiny_base):
    from diffusers import UNet2DConditionModel

    config = dict(tiny_base.unet.config)
    config["in_channels"] = 4
    torch.manual_seed(1)
    sd_unet = UNet2DConditionModel.from_config(config)

    class SDPipe:  # the parts convert_sd15_to_ip2p reads
        unet = sd_unet
        vae, text_encoder, tokenizer, scheduler = (tiny_base.pipe.vae, tiny_base.pipe.text_encoder,
                                                   tiny_base.pipe.tokenizer, tiny_base.pipe.scheduler)

    old_weight = sd_unet.conv_in.weight.detach().clone()
    old_bias = sd_unet.conv_in.bias.detach().clone()
    x, text = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        before = sd_unet(x, 10, encoder_hidden_states=text).sample
    pipe = convert_sd15_to_ip2p(SDPipe())
    conv = pipe.unet.conv_in
    assert conv.in_channels == 8 and pipe.unet.config.in_channels == 8
    assert torch.equal(conv.weight[:, :4], old_weight) and torch.count_nonzero(conv.weight[:, 4:]) == 0
    assert torch.equal(conv.bias, old_bias)  # diffusers#4960: their script leaves the bias random
    image_latent = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        after = pipe.unet(torch.cat([x, image_latent], 1), 10, encoder_hidden_states=text).sample
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_text_to_image_folder_is_refused_with_conversion_hint(tiny_base_dir, tmp_path):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_base_dir, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 4
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterkitError, match="convert-base"):
        load_base(str(folder))


@pytest.mark.parametrize(
    "name, message",
    [
        ("/definitely/not/here", "not a folder"),
        ("some-org/some-model-that-is-not-cached", "not available offline"),
    ],
)
def test_unavailable_bases_give_one_line_errors(name, message):
    with pytest.raises(AdapterkitError, match=message) as info:
        load_base(name)
    assert "\n" not in str(info.value)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(AdapterkitError, match="model_index.json"):
        load_base(str(tmp_path))


def test_empty_tokenizer_is_refused(tiny_base_dir, tmp_path):
    # transformers 5 returns a 2-token tokenizer when its files do not load offline; a pipeline on it edits blindly.
    import shutil

    folder = tmp_path / "empty-tokenizer"
    shutil.copytree(tiny_base_dir, folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(AdapterkitError, match="tokenizer .* came back empty"):
        load_base(str(folder))
    assert os.path.isdir(folder)
