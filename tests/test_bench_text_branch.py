"""bench/tiny_tasks.py's text-only column: with `_text_branch_only` active, the instruction's third of the K/V
input goes through the active adapter and the two empty-prompt thirds through the base's weights, for both
methods; leaving the context removes the hooks."""

from __future__ import annotations

import pytest
import torch

from adapterkit.adapters.bank import AdapterBank
from adapterkit.testing import random_custom_diffusion, random_lora


@pytest.mark.parametrize("method", ["custom-diffusion", "lora"])
def test_empty_prompt_rows_use_the_base_kv_and_the_instruction_rows_the_adapter(tiny_base, method, tiny_tasks_bench):
    base_kv = tiny_tasks_bench._base_kv(tiny_base.pipe.unet)
    name = sorted(base_kv)[0]
    bank = AdapterBank(tiny_base)
    make = random_custom_diffusion if method == "custom-diffusion" else random_lora
    bank.add(make(tiny_base, "task", seed=3, instructions=["do the task"]))
    try:
        bank.activate("task")
        module = dict(tiny_base.pipe.unet.named_modules())[name]
        x = torch.randn(6, 77, base_kv[name].shape[1], generator=torch.Generator().manual_seed(0))  # B = 2
        with torch.no_grad():
            adapted = module(x)
            with tiny_tasks_bench._text_branch_only(tiny_base.pipe.unet, base_kv):
                mixed = module(x)
            after = module(x)
        base_out = torch.nn.functional.linear(x, base_kv[name])
        assert (adapted - base_out).abs().max() > 1e-3  # the adapter changes this layer
        torch.testing.assert_close(mixed[:2], adapted[:2])
        torch.testing.assert_close(mixed[2:], base_out[2:])
        torch.testing.assert_close(after, adapted)  # hooks gone
    finally:
        bank.close()
