"""`train()` through the code path a GPU run takes, on CPU: frozen weights cast to bf16, adapter parameters kept fp32
and the only trainable ones, finite loss, checkpoint and an exact resume; and the fp16 rule (trainable parameters
stay fp32, so accelerate's GradScaler can unscale their gradients)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.adapters import get_method
from adapterkit.base import load_base
from adapterkit.testing import make_edit_dataset
from adapterkit.train import TrainConfig, train
from adapterkit.train import loop as loop_module
from adapterkit.train.setup import cast_frozen_weights

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHT_FILES = {"custom-diffusion": "pytorch_custom_diffusion_weights.safetensors", "lora": "pytorch_lora_weights.safetensors"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_edit_dataset(tmp_path_factory.mktemp("precision_data") / "invert", 8, size=32)


def _config(base_dir, data_dir, output, method, **changes) -> TrainConfig:
    settings = dict(
        base=base_dir, data=data_dir, method=method, task="invert", output=str(output), resolution=32, steps=4,
        batch_size=2, learning_rate=1e-2, validation_steps=0, checkpoint_steps=2, quiet=True, log_with="none",
        mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw8bit",
    )
    return TrainConfig(**{**settings, **changes})


class _Killed(Exception):
    pass


def test_bf16_run_casts_frozen_weights_keeps_adapter_fp32_and_resumes_exactly(trainable_base_dir, data_dir, tmp_path, monkeypatch, method):
    seen = {}
    real_save = loop_module._save_checkpoint

    def inspect_then_save(run, state):  # the live model, mid run, as the optimizer sees it
        unet = run.accelerator.unwrap_model(run.unet)
        seen["trainable"] = {n: p.dtype for n, p in unet.named_parameters() if p.requires_grad}
        seen["frozen"] = {p.dtype for p in unet.parameters() if not p.requires_grad}
        seen["encoders"] = {p.dtype for part in (run.base.pipe.vae, run.base.pipe.text_encoder) for p in part.parameters()}
        seen["params"] = {p.dtype for p in run.params}
        seen["grads"] = run.accelerator.mixed_precision
        return real_save(run, state)

    monkeypatch.setattr(loop_module, "_save_checkpoint", inspect_then_save)
    whole = train(_config(trainable_base_dir, data_dir, tmp_path / "whole", method))
    assert seen["frozen"] == {torch.bfloat16} and seen["encoders"] == {torch.bfloat16}
    assert set(seen["trainable"].values()) == {torch.float32} and seen["params"] == {torch.float32}
    assert all(get_method(method).is_adapter_parameter(n) for n in seen["trainable"]) and seen["grads"] == "bf16"
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in whole.tensors.values())
    loss = whole.training["final_loss"]
    assert loss is not None and torch.isfinite(torch.tensor(loss))
    base = load_base(trainable_base_dir)  # the adapter moved away from the base (the steps did something)
    before = get_method(method).extract(base.unet) if method == "custom-diffusion" else None
    if before is not None:
        assert any(not torch.equal(before[k], whole.tensors[k]) for k in whole.tensors)
    else:
        assert any(float(t.abs().max()) > 0 for k, t in whole.tensors.items() if "lora_B" in k or "lora.up" in k)

    def save_then_die(run, state):
        path = real_save(run, state)
        if state.step == 2:
            raise _Killed
        return path

    monkeypatch.setattr(loop_module, "_save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train(_config(trainable_base_dir, data_dir, tmp_path / "split", method))
    monkeypatch.setattr(loop_module, "_save_checkpoint", real_save)
    train(_config(trainable_base_dir, data_dir, tmp_path / "split", method, resume="latest"))
    a = load_file(os.path.join(tmp_path / "whole", WEIGHT_FILES[method]))
    b = load_file(os.path.join(tmp_path / "split", WEIGHT_FILES[method]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_keeps_trainable_parameters_fp32_so_the_grad_scaler_can_unscale(trainable_base_dir, method):
    """A GPU fp16 run casts the frozen weights to fp16; checked here on CPU with the same cast, CPU autocast in fp16
    and torch's GradScaler, whose unscale_ raises 'Attempting to unscale FP16 gradients' for any fp16 gradient."""
    base = load_base(trainable_base_dir)
    unet = base.unet
    adapter = get_method(method)
    params = adapter.make_trainable(unet, adapter.training_options({"rank": 4, "lora_alpha": None, "targets": "kv"}))
    cast_frozen_weights(unet, torch.float16)
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.float16}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sample = torch.randn(1, 8, 16, 16)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.autocast("cpu", dtype=torch.float16):
        out = unet(sample, torch.tensor([10]), encoder_hidden_states=text).sample
    scaler.scale(out.float().pow(2).mean()).backward()
    scaler.unscale_(optimizer)  # raises on fp16 gradients
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params)
    scaler.step(optimizer)

    with pytest.raises(RuntimeError, match="must stay float32"):  # the guard: a half-precision trainable weight is refused
        params[0].data = params[0].data.half()
        cast_frozen_weights(unet, torch.float16)
