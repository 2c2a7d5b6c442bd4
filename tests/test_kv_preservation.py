"""K/V preservation while training (train/preservation.py) and the merge rule it enables (--positions eos+padding,
picked by "auto" when every source was trained with it)."""

from __future__ import annotations

import pytest
import torch

from adapterkit.adapters import get_method, load_adapter
from adapterkit.base import cross_attention_kv_layers, load_base
from adapterkit.merge import features, merge
from adapterkit.merge.methods import resolve_positions
from adapterkit.testing import make_edit_dataset, random_custom_diffusion
from adapterkit.train import TrainConfig, train
from adapterkit.train.preservation import KVPreservation, preservation_prompts

pytestmark = pytest.mark.usefixtures("one_thread", "feature_cache")


def test_preservation_prompts_leave_out_the_tasks_neighbours_and_keep_the_rest():
    derain = preservation_prompts(["derain the image", "remove the rain"])
    cartoonize = preservation_prompts(["cartoonize the image", "make it a cartoon"])
    everything = features.read_prompts()
    assert "a garden in the rain" not in derain and "make it look like a cartoon" in derain
    assert "make it look like a cartoon" not in cartoonize and "a garden in the rain" in cartoonize
    # the common words (the, a, it, make, ...) exclude nothing: the base's other edits and "" stay
    for kept in ("brighten the shadows", "invert the colors", ""):
        assert kept in derain and kept in cartoonize
    assert 0.8 * len(everything) < len(derain) < len(everything)


def test_the_term_is_zero_at_the_start_and_measures_the_relative_kv_change(trainable_base_dir, method):
    base = load_base(trainable_base_dir)
    module = get_method(method)
    options = module.training_options({"rank": 4, "lora_alpha": 4, "targets": "kv"})
    params = module.make_trainable(base.pipe.unet, options)
    term = KVPreservation(base, module, options, 2.0, ["invert the colors"], "cpu")
    assert float(term.loss(base.pipe.unet).detach()) == 0.0
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # LoRA: A and B both nonzero now
    loss = term.loss(base.pipe.unet)
    loss.backward()
    assert float(loss.detach()) > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.ndim == 2)
    # 2 x the mean over layers of tr(dW M dW^T) / tr(W0 M W0^T), from the weights themselves
    layers = cross_attention_kv_layers(base.pipe.unet)
    deltas = module.live_kv_delta(base.pipe.unet, options, term.base_kv)
    expected = 2.0 * sum(float(((d.detach() @ term.gram) * d.detach()).sum()) / float(((term.base_kv[n] @ term.gram) * term.base_kv[n]).sum())
                         for n, d in deltas.items()) / len(deltas)
    assert set(deltas) <= set(layers) and float(loss.detach()) == pytest.approx(expected, rel=1e-4)


def _relative_kv_change(base, adapter, prompts) -> float:
    """Mean over K/V layers of the relative change of their outputs on `prompts` (all 77 positions)."""
    gram, _rows = features.regularization_gram(base, prompts, positions="all")
    base_kv = {n: l.weight.detach().double() for n, l in cross_attention_kv_layers(base.unet).items()}
    deltas = adapter.delta_weights(base_kv, dtype=torch.float64)
    ratios = [float(((d @ gram) * d).sum() / ((base_kv[n] @ gram) * base_kv[n]).sum()) for n, d in deltas.items()]
    return sum(ratios) / len(ratios)


def test_training_with_preservation_changes_other_prompts_less_and_records_it(trainable_base_dir, tmp_path, method):
    data = make_edit_dataset(tmp_path / "invert", 8, size=32)
    results = {}
    for weight in (0.0, 10.0):
        cfg = TrainConfig(base=trainable_base_dir, data=data, method=method, task="invert", output=str(tmp_path / f"out-{weight}"),
                          resolution=32, steps=15, batch_size=4, learning_rate=2e-2, kv_preservation=weight,
                          validation_steps=0, checkpoint_steps=0, quiet=True, log_with="none")
        results[weight] = train(cfg)
    base = load_base(trainable_base_dir)
    prompts = preservation_prompts(results[10.0].instructions)
    plain, preserved = (_relative_kv_change(base, results[w], prompts) for w in (0.0, 10.0))
    assert preserved < 0.5 * plain, (plain, preserved)
    assert load_adapter(str(tmp_path / "out-10.0")).training["kv_preservation"] == 10.0
    assert results[0.0].training["kv_preservation"] == 0.0


def test_negative_weight_is_refused():
    from adapterkit.errors import AdapterkitError

    with pytest.raises(AdapterkitError, match="--kv-preservation must not be negative"):
        TrainConfig(base="b", data="d", method="lora", task="t", output="o", kv_preservation=-1.0)


def test_auto_positions_constrain_padding_directions_only_for_preserved_sources(tiny_base):
    a = random_custom_diffusion(tiny_base, "derain", seed=1, instructions=["derain the image", "remove the rain"])
    b = random_custom_diffusion(tiny_base, "cartoonize", seed=2, instructions=["cartoonize the photo"])
    assert resolve_positions("auto", [a, b]) == "eos"
    plain = merge([a, b], tiny_base, method="lsq", quiet=True)
    a.training, b.training = {"kv_preservation": 1.0}, {"kv_preservation": 0.3}
    assert resolve_positions("auto", [a, b]) == "eos+padding"
    assert resolve_positions("eos", [a, b]) == "eos"  # an explicit rule stays
    padded = merge([a, b], tiny_base, method="lsq", quiet=True, max_rows=32)  # every row (the text width is 32)
    assert plain.report["positions"] == "eos" and padded.report["positions"] == "eos+padding"
    rows = features.instruction_features(tiny_base, ["derain the image"], "eos+padding")["derain the image"]
    eos_rows = features.instruction_features(tiny_base, ["derain the image"], "eos")["derain the image"]
    assert eos_rows.shape[0] < rows.shape[0] <= eos_rows.shape[0] + features.PADDING_DIRECTIONS
    assert padded.report["constraint_rows"] > plain.report["constraint_rows"]
    # the merge holds each task's adapter exactly on those rows too
    for adapter in (a, b):
        for text in adapter.instructions:
            x = features.instruction_features(tiny_base, [text], "eos+padding")[text]
            for name, dw in padded.updates.items():
                own = adapter.delta_weights({n: l.weight.detach().double() for n, l in cross_attention_kv_layers(tiny_base.unet).items()},
                                            dtype=torch.float64)[name]
                assert torch.allclose(x @ dw.T, x @ own.T, atol=1e-6 * float(own.abs().max()) * x.abs().sum(1).max())


def test_padding_directions_summarise_the_block():
    torch.manual_seed(0)
    block = torch.randn(70, 3, dtype=torch.float64) @ torch.randn(3, 16, dtype=torch.float64)  # rank 3
    rows = features.padding_directions(block)
    assert rows.shape == (3, 16)
    # the directions' Gram equals the block's mean outer product: a weight matching them matches the block
    assert torch.allclose(rows.T @ rows, block.T @ block / 70, atol=1e-9)
    assert features.padding_directions(block[:0]).shape == (0, 16)
