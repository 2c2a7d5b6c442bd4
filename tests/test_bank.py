"""AdapterBank hot-swap: exactness, torch.compile without recompiles, routing (issue 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from adapterkit.testing import random_custom_diffusion, random_lora

from adapterkit.adapters.bank import AdapterBank
from adapterkit.base import load_base
from adapterkit.errors import AdapterkitError
from adapterkit.inference import run_pipeline

GEN = dict(steps=2, seed=3, output_type="np")


def adapters_for(base):
    return [
        random_custom_diffusion(base, "cd_a", seed=1),
        random_custom_diffusion(base, "cd_b", seed=2),
        random_lora(base, "lora_a", rank=2, alpha=4.0, seed=3),
        random_lora(base, "lora_b", rank=6, seed=4, targets="attn"),  # wider rank and more modules
    ]


@pytest.fixture(scope="module")
def fresh_outputs(tiny_base_dir):
    """Each adapter's output on a freshly loaded base holding only that adapter, computed once per module."""
    from adapterkit.testing import random_image

    outputs = {}
    for adapter in adapters_for(load_base(tiny_base_dir)):
        bank = AdapterBank(load_base(tiny_base_dir))
        bank.add(adapter)
        outputs[adapter.task] = bank.edit(random_image(0), "x", task=adapter.task, **GEN)
    return outputs


@pytest.mark.parametrize("order", [["cd_a", "cd_b", "cd_a"], ["lora_a", "lora_b", "lora_a"], ["cd_a", "lora_b", "cd_b", "lora_a", "cd_a"]])
def test_swap_a_b_a_equals_a_fresh_pipeline(fresh_outputs, tiny_base, image, order):
    adapters = {a.task: a for a in adapters_for(tiny_base)}
    bank = AdapterBank(tiny_base)
    for adapter in adapters.values():
        bank.add(adapter)
    base_output = bank.edit(image, "x", task=None, **GEN)
    outputs = [(task, bank.edit(image, "x", task=task, **GEN)) for task in order]
    for task, output in outputs:
        assert np.abs(output - fresh_outputs[task]).max() <= 1e-5, task
        assert np.abs(output - base_output).max() > 1e-3, task  # each adapter really changes the edit
    bank.deactivate()
    np.testing.assert_array_equal(bank.edit(image, "x", task=None, **GEN), base_output)


def test_deactivate_restores_the_base_weights_exactly(tiny_base, image):
    from adapterkit.base import cross_attention_kv_layers

    before = {k: v.weight.detach().clone() for k, v in cross_attention_kv_layers(tiny_base.unet).items()}
    reference = AdapterBank(load_base("builtin:tiny-random")).edit(image, "x", task=None, **GEN)
    bank = AdapterBank(tiny_base)
    for adapter in adapters_for(tiny_base):
        bank.add(adapter)
    for task in ("lora_b", "cd_a", "lora_a"):
        bank.activate(task)
    bank.deactivate()
    for name, layer in cross_attention_kv_layers(tiny_base.unet).items():
        assert torch.equal(layer.weight, before[name])
    np.testing.assert_array_equal(bank.edit(image, "x", task=None, **GEN), reference)


def test_compiled_unet_swaps_without_recompiling(fresh_outputs, tiny_base, image):
    """aot_eager on CPU, recompiles raise: LoRA r=2 <-> r=6 (other targets) and Custom Diffusion A <-> B."""
    import torch._dynamo

    bank = AdapterBank(tiny_base)
    for adapter in adapters_for(tiny_base):
        bank.add(adapter)
    expected = {**fresh_outputs, None: bank.edit(image, "x", task=None, **GEN)}
    bank.prepare()
    torch._dynamo.reset()
    bank.pipe.unet = torch.compile(bank.pipe.unet, backend="aot_eager")
    bank.edit(image, "x", task="lora_a", **GEN)  # compiles once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task in ("lora_b", "lora_a", "cd_a", "cd_b", "lora_b", None, "cd_a", "lora_a"):
            output = bank.edit(image, "x", task=task, **GEN)
            assert np.abs(output - expected[task]).max() <= 1e-5, task
    torch._dynamo.reset()


def test_wider_lora_after_compile_is_refused_with_a_fix(tiny_base):
    bank = AdapterBank(tiny_base)
    bank.add(random_lora(tiny_base, "small", rank=2))
    bank.prepare()
    bank.pipe.unet = torch.compile(bank.pipe.unet, backend="aot_eager")
    with pytest.raises(AdapterkitError, match="before torch.compile"):
        bank.add(random_lora(tiny_base, "wide", rank=8))


def test_routing_by_instruction(tiny_base):
    bank = AdapterBank(tiny_base)
    bank.add(random_custom_diffusion(tiny_base, "derain", instructions=["derain the image", "remove the rain"]))
    bank.add(random_lora(tiny_base, "cartoonize", instructions=["cartoonize the image"]))
    assert bank.route("Remove the  RAIN") == ("derain", 1.0)  # stored instruction: case and spacing ignored
    assert bank.route("cartoonize the image")[0] == "cartoonize"
    task, score = bank.route("a photo of a cat sitting on a sofa, oil painting")
    assert task is None and score < bank.route_threshold  # nothing close: the base alone
    bank.route_threshold = -1.0
    assert bank.route("a photo of a cat sitting on a sofa, oil painting")[0] in ("derain", "cartoonize")


def test_unknown_task_and_duplicate_task_are_refused(tiny_base):
    bank = AdapterBank(tiny_base)
    bank.add(random_custom_diffusion(tiny_base, "derain"))
    with pytest.raises(AdapterkitError, match="no adapter for task 'nope'"):
        bank.activate("nope")
    with pytest.raises(AdapterkitError, match="already holds a task named 'derain'"):
        bank.add(random_lora(tiny_base, "derain"))


def test_a_second_bank_on_one_pipeline_is_refused_while_the_first_holds_state(tiny_base):
    first = AdapterBank(tiny_base)
    first.add(random_lora(tiny_base, "lora_a", rank=2, seed=3))
    first.add(random_custom_diffusion(tiny_base, "cd_a", seed=1))
    first.activate("cd_a")
    with pytest.raises(AdapterkitError, match="no longer match its fingerprint"):
        AdapterBank(tiny_base)
    first.activate("lora_a")
    first.deactivate()
    second = AdapterBank(tiny_base)  # K/V back to the base: accepted
    second.add(random_lora(tiny_base, "lora_b", rank=2, seed=4))
    with pytest.raises(AdapterkitError, match="live LoRA slot of another AdapterBank"):
        second.activate("lora_b")


def test_close_gives_the_pipeline_back_for_another_bank(tiny_base_dir, tiny_base, image):
    lora_a = random_lora(tiny_base, "a", rank=2)  # made before any bank wraps the UNet's layers
    cd_b = random_custom_diffusion(tiny_base, "b")
    first = AdapterBank(tiny_base)
    first.add(lora_a)
    first.add(cd_b)
    before = {t: first.edit(image, "x", task=t, steps=2, seed=0, output_type="np") for t in ("a", "b")}
    first.close()
    assert not getattr(tiny_base.unet, "peft_config", None)  # the live slot is gone
    plain = run_pipeline(tiny_base.pipe, image, "x", steps=2, seed=0, output_type="np")
    fresh = run_pipeline(load_base(tiny_base_dir).pipe, image, "x", steps=2, seed=0, output_type="np")
    assert np.array_equal(plain, fresh)  # base K/V restored exactly
    second = AdapterBank(tiny_base)  # refused before close() existed: the first bank's slot was still there
    second.add(lora_a)
    second.add(cd_b)
    for task, output in before.items():
        assert np.array_equal(second.edit(image, "x", task=task, steps=2, seed=0, output_type="np"), output)
