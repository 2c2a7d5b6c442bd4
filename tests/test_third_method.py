"""The method protocol is enough for a new method: a throwaway third one, a learned per-channel scale on attn2 K/V
(W' = diag(s) W, s initialised to 1), registered here and nowhere else, trains through the real train(), saves,
loads, swaps in the bank and merges with a baseline. No library file knows it exists."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterkit.adapters import AdapterBank, load_adapter, register_method, unregister_method
from adapterkit.base import cross_attention_kv_layers, load_base
from adapterkit.merge import merge
from adapterkit.testing import make_edit_dataset, random_custom_diffusion, random_image
from adapterkit.train import TrainConfig, train


class ChannelScale:
    """The method, as a namespace with the protocol's verbs (adapters/registry.py PROTOCOL). Tensors: {K/V layer: s (d_out,)}."""

    METHOD, FILE_NAME, LEGACY_FILE_NAME, METADATA_KEYS = "channel-scale", "channel_scale.safetensors", "channel_scale.bin", ()
    training_options = staticmethod(lambda settings: None)
    check_options = staticmethod(lambda options, task: None)
    is_adapter_parameter = staticmethod(lambda name: name.endswith(".channel_scale"))
    targets = staticmethod(lambda tensors: sorted(tensors))
    rank = staticmethod(lambda tensors, options=None: None)
    metadata = staticmethod(lambda tensors, options=None: {})
    card = staticmethod(lambda tensors, options=None: (f"per-channel K/V scales on {len(tensors)} layers", "# adapterkit only\n"))

    @staticmethod
    def make_trainable(unet, options=None):
        unet.requires_grad_(False)
        params = []
        for layer in cross_attention_kv_layers(unet).values():
            layer.channel_scale = torch.nn.Parameter(torch.ones(layer.weight.shape[0]))  # (d_out,)
            layer.register_forward_hook(lambda module, args, out: out * module.channel_scale)
            params.append(layer.channel_scale)
        return params

    @staticmethod
    def extract(unet):
        return {n: l.channel_scale.detach().float().cpu().clone() for n, l in cross_attention_kv_layers(unet).items()}

    @staticmethod
    def load_trainable(unet, tensors):
        with torch.no_grad():
            for name, layer in cross_attention_kv_layers(unet).items():
                layer.channel_scale.copy_(tensors[name])

    @staticmethod
    def live_kv_delta(unet, options, base_kv):
        return {n: (l.channel_scale - 1)[:, None] * base_kv[n] for n, l in cross_attention_kv_layers(unet).items()}

    @staticmethod
    def delta_weights(tensors, base_weights, options=None, dtype=torch.float32):
        return {n: (s.to(dtype) - 1)[:, None] * base_weights[n].to(dtype) for n, s in tensors.items()}  # (s - 1) W0

    @staticmethod
    def check_shapes(tensors, unet):
        layers = cross_attention_kv_layers(unet)
        assert all(n in layers and s.shape == (layers[n].weight.shape[0],) for n, s in tensors.items())

    @staticmethod
    def fuse_into_base(unet, tensors, options=None):
        with torch.no_grad():
            for name, layer in cross_attention_kv_layers(unet).items():
                layer.weight.mul_(tensors[name].to(layer.weight.dtype)[:, None])

    write = staticmethod(lambda folder, tensors, options=None: save_file(tensors, os.path.join(folder, ChannelScale.FILE_NAME)))
    read = staticmethod(lambda folder: (load_file(os.path.join(folder, ChannelScale.FILE_NAME)), None))

    class Swap:
        def __init__(self, pipe):
            self.layers = cross_attention_kv_layers(pipe.unet)
            self.base = {n: l.weight.detach().clone() for n, l in self.layers.items()}

        add = prepare = lambda self, *adapter: None

        def activate(self, adapter):
            with torch.no_grad():
                for name, s in adapter.tensors.items():
                    self.layers[name].weight.copy_(self.base[name] * s[:, None])

        def deactivate(self):
            with torch.no_grad():
                for name, layer in self.layers.items():
                    layer.weight.copy_(self.base[name])

        close = deactivate


@pytest.fixture
def registered():
    register_method(ChannelScale)
    yield ChannelScale.METHOD
    unregister_method(ChannelScale.METHOD)


def test_a_third_method_trains_saves_loads_swaps_and_merges(registered, trainable_base_dir, tmp_path):
    data = make_edit_dataset(tmp_path / "data", 8, size=32)
    output = str(tmp_path / "scale")
    trained = train(TrainConfig(base=trainable_base_dir, data=data, method=registered, task="invert", output=output,
                                resolution=32, steps=6, batch_size=2, learning_rate=5e-2, validation_steps=0,
                                checkpoint_steps=3, quiet=True, log_with="none"))
    assert any(not torch.allclose(s, torch.ones_like(s)) for s in trained.tensors.values())  # the scales learned
    loaded = load_adapter(output)  # the method comes from adapter.json, through the registry
    assert loaded.method == registered and os.path.isfile(os.path.join(output, ChannelScale.FILE_NAME))
    assert all(torch.equal(loaded.tensors[k], v) for k, v in trained.tensors.items())

    base = load_base(trainable_base_dir)
    w0 = {n: l.weight.detach().clone() for n, l in cross_attention_kv_layers(base.unet).items()}
    baseline = random_custom_diffusion(base, "other", seed=1)
    bank = AdapterBank(base)
    bank.add(loaded)
    bank.add(baseline)
    image = random_image(0, size=32)
    plain = bank.edit(image, "invert the image", task=None, steps=2, seed=0, output_type="np")
    bank.activate("invert")
    for name, layer in cross_attention_kv_layers(base.unet).items():
        assert torch.equal(layer.weight, w0[name] * loaded.tensors[name][:, None])
    bank.activate("other")  # across methods: the scales go, the other adapter's K/V come in
    assert all(torch.equal(l.weight, baseline.tensors[n]) for n, l in cross_attention_kv_layers(base.unet).items())
    bank.deactivate()
    again = bank.edit(image, "invert the image", task=None, steps=2, seed=0, output_type="np")
    assert (plain == again).all()
    bank.close()

    merged = merge([loaded, baseline], base, "linear").adapter  # a Custom Diffusion adapter: full K/V
    for name, w in merged.tensors.items():
        want = w0[name].double() + ((loaded.tensors[name].double() - 1)[:, None] * w0[name].double()
                                    + (baseline.tensors[name].double() - w0[name].double())) / 2
        assert torch.allclose(w.double(), want, atol=1e-6)
