"""Least squares keeps the base's own edits: the instructions a base records (adapterkit_base.json "instructions")
weigh `base_instructions_weight` times in the regularization Gram, and the ridge defaults by whether they do
(merge/methods.py resolve_lsq_defaults; README, merge)."""

from __future__ import annotations

import pytest
import torch

from adapterkit.base import cross_attention_kv_layers, load_base
from adapterkit.errors import AdapterkitError
from adapterkit.merge import features, merge
from adapterkit.merge.methods import BASE_INSTRUCTIONS_RIDGE, DEFAULT_BASE_INSTRUCTIONS_WEIGHT, DEFAULT_RIDGE
from adapterkit.testing import instruction_custom_diffusion

pytestmark = pytest.mark.usefixtures("one_thread", "feature_cache")

PAIR = [("derain", ["derain the image", "remove the rain"]), ("cartoonize", ["cartoonize the image", "make it a cartoon"])]


@pytest.fixture(scope="module")
def tiny():
    return load_base("builtin:tiny")


@pytest.fixture(scope="module")
def pair(tiny):
    return [instruction_custom_diffusion(tiny, task, texts, seed=seed) for seed, (task, texts) in enumerate(PAIR, start=1)]


def test_each_base_instruction_row_counts_weight_times(tiny):
    prompts = ["", "a photo of a cat", "a red car on a street"]  # none of them is one of the base's instructions
    recorded = list(tiny.info["instructions"])
    assert len(recorded) == 80 and not set(prompts) & set(recorded)
    gram, rows = features.regularization_gram(tiny, prompts)
    mixed, effective = features.with_base_instructions(tiny, gram, rows, 1.0)
    union, union_rows = features.regularization_gram(tiny, prompts + recorded)
    assert effective == union_rows == rows + 77 * len(recorded)
    assert torch.allclose(mixed, union, rtol=1e-9, atol=1e-12)  # weight 1: the prompts and instructions as one set
    tripled, effective3 = features.with_base_instructions(tiny, gram, rows, 3.0)
    own, own_rows = features.regularization_gram(tiny, recorded)
    assert effective3 == rows + 3 * own_rows
    assert torch.allclose(tripled * effective3, gram * rows + 3 * own * own_rows, rtol=1e-9)
    assert features.with_base_instructions(tiny, gram, rows, 0.0) == (gram, float(rows))


def _kv_change(tiny, result, texts):
    """Mean over K/V layers of ||dW C^T|| / ||W0 C^T|| on every position of `texts` (what the UNet reads)."""
    _ids, hidden = features.encode_tokens(tiny.pipe, texts)
    rows = hidden.reshape(-1, hidden.shape[-1]).double()
    w0 = {name: layer.weight.detach().double() for name, layer in cross_attention_kv_layers(tiny.unet).items()}
    ratios = [float((delta @ rows.T).norm() / (w0[name] @ rows.T).norm()) for name, delta in result.updates.items()]
    return sum(ratios) / len(ratios)


def test_default_merge_weighs_in_the_base_instructions_and_keeps_them(tiny, pair):
    default = merge(pair, tiny, "lsq", quiet=True)
    options = default.adapter.merge.options
    assert options["ridge"] == BASE_INSTRUCTIONS_RIDGE and options["base_instructions_weight"] == DEFAULT_BASE_INSTRUCTIONS_WEIGHT
    explicit = merge(pair, tiny, "lsq", ridge=BASE_INSTRUCTIONS_RIDGE, base_instructions_weight=100, quiet=True)
    assert all(torch.equal(explicit.adapter.tensors[n], t) for n, t in default.adapter.tensors.items())
    reg = default.report["regularization"]
    assert reg["base_instructions"] == 80 and reg["effective_rows"] == reg["rows"] + 100 * 80 * 77
    assert "and the base's 80 own instructions x100" in default.table and "ridge 0.01" in default.table
    assert all(task["residual"] < 1e-3 for task in default.report["tasks"])  # the constraints still hold exactly
    unweighted = merge(pair, tiny, "lsq", ridge=BASE_INSTRUCTIONS_RIDGE, base_instructions_weight=0, quiet=True)
    own = [t for t in tiny.info["instructions"] if t not in {x for _, texts in PAIR for x in texts}]
    kept, moved = _kv_change(tiny, default, own), _kv_change(tiny, unweighted, own)
    print(f"K/V change on the base's own instructions: weighted {kept:.4f}, unweighted {moved:.4f}")
    assert kept < 0.7 * moved  # measured 0.22 vs 0.38


def test_a_base_recording_no_instructions_keeps_the_plain_defaults(tiny_v1):
    pair = [instruction_custom_diffusion(tiny_v1, task, texts[:1], seed=seed) for seed, (task, texts) in enumerate(PAIR, 1)]
    result = merge(pair, tiny_v1, "lsq", quiet=True)
    assert result.adapter.merge.options["ridge"] == DEFAULT_RIDGE
    assert result.adapter.merge.options["base_instructions_weight"] == 0
    assert result.report["regularization"]["base_instructions"] == 0
    with pytest.raises(AdapterkitError, match="records none; drop the option"):
        merge(pair, tiny_v1, "lsq", base_instructions_weight=10, quiet=True)
