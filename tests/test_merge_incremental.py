"""Issue 15: incremental merging. A least-squares merge stores its tasks' constraint rows and targets, so
`adapterkit merge merged new-task` needs no source folders and equals merging every task from scratch."""

from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

from adapterkit.adapters import load_adapter, save_adapter
from adapterkit.base import cross_attention_kv_layers
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.merge import merge
from adapterkit.testing import random_custom_diffusion, random_lora

CONSTRAINTS_FILE = "merge_constraints.safetensors"  # what a merged lsq folder stores (adapterkit.merge.incremental)


pytestmark = pytest.mark.usefixtures("feature_cache")  # conftest.py: one cache outside the home


def three(base):
    # "make it" is shared by all three tasks: from scratch its rows hold the mean of three targets.
    return (
        random_custom_diffusion(base, "rainy", seed=1, instructions=["make it rain"]),
        random_lora(base, "snowy", rank=2, seed=2, instructions=["make it snow"]),
        random_custom_diffusion(base, "foggy", seed=3, instructions=["make it foggy"]),
    )


def gap(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in b)


@pytest.mark.parametrize("method", ["lsq", "lsq-soft"])
def test_issue15_incremental_merge_equals_merging_from_scratch(tiny_base, tmp_path, method):
    a, b, c = three(tiny_base)
    folders = [save_adapter(x, str(tmp_path / x.task)) for x in (a, b, c)]
    scratch = merge(folders, tiny_base, method, output=str(tmp_path / "all"), quiet=True)
    first = merge(folders[:2], tiny_base, method, output=str(tmp_path / "ab"), quiet=True)
    shutil.rmtree(folders[0])
    shutil.rmtree(folders[1])  # the sources are gone: only the merged folder holds them now
    later = merge([str(tmp_path / "ab"), folders[2]], tiny_base, method, output=str(tmp_path / "abc"), quiet=True)
    assert gap(later.updates, scratch.updates) <= 1e-6
    stored = tmp_path / "ab" / CONSTRAINTS_FILE
    layers = cross_attention_kv_layers(tiny_base.unet)
    per_row = 8 * (sum(l.weight.shape[0] for l in layers.values()) + next(iter(layers.values())).weight.shape[1])
    rows = sum(t["target_rows"] for t in first.report["tasks"])
    assert os.path.getsize(stored) < rows * per_row + 8192  # float64 rows + targets + header
    assert sorted(t["task"] for t in later.report["tasks"]) == ["foggy", "rainy", "snowy"]
    assert later.report["constraint_rows"] == scratch.report["constraint_rows"]
    assert later.adapter.instructions == scratch.adapter.instructions
    assert {s["task"] for s in load_adapter(str(tmp_path / "abc")).merge.sources} == {"rainy", "snowy", "foggy"}
    # In memory, without saving, and chained once more.
    again = merge([first.adapter, c], tiny_base, method, quiet=True)
    assert gap(again.updates, scratch.updates) <= 1e-6
    assert first.report["tasks"][0]["source_drift"] == later.report["tasks"][0]["source_drift"]


def test_incremental_merge_refuses_another_position_rule(tiny_base, tmp_path):
    a, b, c = three(tiny_base)
    merged = merge([a, b], tiny_base, "lsq", output=str(tmp_path / "ab"), quiet=True)
    with pytest.raises(AdapterkitError, match="--positions eos"):
        merge([merged.path, c], tiny_base, "lsq-soft", positions="all", quiet=True)


def test_cli_merge_of_a_merged_adapter_and_a_new_task(tiny_base_dir, tmp_path):
    from adapterkit.base import load_base

    base = load_base(tiny_base_dir)
    a, b, c = three(base)
    folders = [save_adapter(x, str(tmp_path / x.task)) for x in (a, b, c)]
    runner = CliRunner()
    common = ["--base", tiny_base_dir, "--quiet"]
    assert runner.invoke(main, ["merge", *folders[:2], "--output", str(tmp_path / "ab"), *common]).exit_code == 0
    assert runner.invoke(main, ["merge", folders[0], folders[1], folders[2], "--output", str(tmp_path / "all"), *common]).exit_code == 0
    run = runner.invoke(main, ["merge", str(tmp_path / "ab"), folders[2], "--output", str(tmp_path / "abc"), *common])
    assert run.exit_code == 0, run.output
    layers = cross_attention_kv_layers(base.unet)
    scratch, later = load_adapter(str(tmp_path / "all")), load_adapter(str(tmp_path / "abc"))
    for name, layer in layers.items():
        w0 = layer.weight.detach().double()
        want = scratch.tensors[name].double() - w0
        assert float((later.tensors[name].double() - w0 - want).norm() / want.norm()) <= 1e-5, name  # float32 files
