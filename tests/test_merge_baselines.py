"""Baseline merges are exact on full delta weights (no LoRA cross terms), seeded, and checked up front."""

from __future__ import annotations


import pytest
import torch
from peft.utils import merge_utils

from adapterkit.base import cross_attention_kv_layers
from adapterkit.errors import AdapterkitError
from adapterkit.merge import baselines, merge
from adapterkit.testing import random_custom_diffusion, random_lora


pytestmark = pytest.mark.usefixtures("feature_cache")  # conftest.py: one cache outside the home


@pytest.fixture
def pair(tiny_base):
    """A Custom Diffusion adapter and a rank-3 LoRA: deltas of full rank and of rank 3."""
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image"])
    b = random_lora(tiny_base, "cartoonize", rank=3, alpha=6.0, seed=2, instructions=["cartoonize the photo"])
    return a, b


def deltas_of(result, tiny_base):
    base = {n: l.weight.detach().double() for n, l in cross_attention_kv_layers(tiny_base.unet).items()}
    return {n: w.double() - base[n] for n, w in result.adapter.tensors.items()}


def exact_deltas(adapter, tiny_base):
    base = {n: l.weight.detach() for n, l in cross_attention_kv_layers(tiny_base.unet).items()}
    return {n: d.double() for n, d in adapter.delta_weights(base).items()}


def test_sum_and_linear_are_exact_task_arithmetic(tiny_base, pair):
    a, b = pair
    da, db = exact_deltas(a, tiny_base), exact_deltas(b, tiny_base)
    total = deltas_of(merge([a, b], tiny_base, "sum", weights=[1.0, 0.5]), tiny_base)
    mean = deltas_of(merge([a, b], tiny_base, "linear"), tiny_base)
    for name in da:
        assert torch.allclose(total[name], da[name] + 0.5 * db[name], atol=1e-5)
        assert torch.allclose(mean[name], (da[name] + db[name]) / 2, atol=1e-5)


def test_ties_and_dare_apply_peft_merge_utils_to_full_deltas(tiny_base, pair):
    a, b = pair
    da, db = exact_deltas(a, tiny_base), exact_deltas(b, tiny_base)
    ones = torch.ones(2, dtype=torch.float64)
    ties = deltas_of(merge([a, b], tiny_base, "ties", density=0.3), tiny_base)
    for name in da:
        want = merge_utils.ties([da[name], db[name]], ones, 0.3)
        assert torch.allclose(ties[name], want, atol=1e-5)
    first = merge([a, b], tiny_base, "dare", density=0.5, seed=3).adapter.tensors
    again = merge([a, b], tiny_base, "dare", density=0.5, seed=3).adapter.tensors
    other = merge([a, b], tiny_base, "dare", density=0.5, seed=4).adapter.tensors
    state = torch.random.get_rng_state()
    merge([a, b], tiny_base, "dare", seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's global generator is left alone
    for name in first:
        assert torch.equal(first[name], again[name])
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_svd_truncates_the_exact_sum(tiny_base, pair):
    a, b = pair
    da, db = exact_deltas(a, tiny_base), exact_deltas(b, tiny_base)
    result = merge([a, b], tiny_base, "svd", rank=2)
    assert result.report["rank"] == {"min": 2, "max": 2}
    merged = deltas_of(result, tiny_base)
    for name in da:
        exact = da[name] + db[name]
        s = torch.linalg.svdvals(exact)
        # Eckart-Young: the error of the best rank-2 approximation is the norm of the dropped singular values.
        assert abs(float((merged[name] - exact).norm()) - float(s[2:].norm())) < 1e-4 * float(s.norm())


def test_svd_of_two_loras_at_full_rank_is_their_exact_sum_as_a_lora(tiny_base):
    a = random_lora(tiny_base, "derain", rank=2, seed=1)
    b = random_lora(tiny_base, "cartoonize", rank=3, seed=2)
    result = merge([a, b], tiny_base, "svd", rank=5, as_lora=True)
    assert result.adapter.method == "lora" and result.adapter.rank == 5
    da, db, merged = a.delta_weights(), b.delta_weights(), result.adapter.delta_weights()
    for name in da:
        assert torch.allclose(merged[name], da[name] + db[name], atol=1e-5)


def test_sum_of_loras_exports_as_lora_at_its_numerical_rank(tiny_base):
    a = random_lora(tiny_base, "derain", rank=2, seed=1)
    b = random_lora(tiny_base, "cartoonize", rank=2, seed=2)
    result = merge([a, b], tiny_base, "sum", as_lora=True)
    assert result.adapter.rank == 4 and result.report["rank"]["max"] == 4
    merged, da, db = result.adapter.delta_weights(), a.delta_weights(), b.delta_weights()
    for name in da:
        assert torch.allclose(merged[name], da[name] + db[name], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "svd"}, "--rank"),
        ({"method": "sum", "weights": [1.0]}, "one weight per adapter"),
        ({"method": "linear", "weights": [1.0, -1.0]}, "sum to zero"),
        ({"method": "ties", "density": 0.0}, "--density"),
        ({"method": "lsq", "weights": [1.0, 1.0]}, "baseline"),
        ({"method": "average"}, "unknown merge method"),
        ({"method": "lsq", "other_modules": "ties"}, "--other-modules"),
    ],
)
def test_bad_options_fail_before_any_work(tiny_base, pair, kwargs, message):
    with pytest.raises(AdapterkitError, match=message):
        merge(list(pair), tiny_base, **kwargs)


def test_combine_treats_an_untouched_module_as_zero_delta():
    deltas = [{"x": torch.ones(2, 2, dtype=torch.float64)}, {"y": torch.ones(2, 2, dtype=torch.float64)}]
    merged = baselines.combine("linear", deltas)
    assert torch.equal(merged["x"], torch.full((2, 2), 0.5, dtype=torch.float64))
    assert torch.equal(merged["y"], torch.full((2, 2), 0.5, dtype=torch.float64))
