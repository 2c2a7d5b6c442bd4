"""Issue 18: what a new user gets from the README's walk-through with default options on builtin:tiny.

The walk-through block runs here at smoke sizes (bench/quickstart.py runs it as written and prints its figures);
the full-size training bar (>= 2 dB with only the required options) is the slow test at the end.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex

import pytest
from click.testing import CliRunner

from adapterkit.cli import main
from conftest import TINY_V1

pytestmark = pytest.mark.usefixtures("one_thread")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
# appended to each command: click keeps an option's last value (the same overrides as bench/quickstart.py --smoke)
SMOKE = {"demo-data": ["--rows", "8"], "train": ["--steps", "2", "--validation-steps", "0"],
         "eval": ["--steps", "2", "--limit", "2"], "edit": ["--steps", "2"]}


def walkthrough() -> list[list[str]]:
    text = open(README, encoding="utf-8").read()
    block = re.search(r"```bash\n(.*?)```", text[text.index("<!-- walkthrough"):], re.S).group(1)
    return [shlex.split(line)[1:] for line in block.replace("\\\n", " ").splitlines() if line.startswith("adapterkit ")]


def test_readme_walkthrough_runs_end_to_end_with_default_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = walkthrough()
    assert [c[0] for c in commands] == ["demo-data"] * 3 + ["train"] * 2 + ["merge", "eval", "edit"]
    for args in commands[3:5]:  # train: only the five required options, nothing tuned
        assert sorted(a for a in args if a.startswith("--")) == ["--base", "--data", "--method", "--output", "--task"]
    printed = {}
    for args in commands:
        result = CliRunner().invoke(main, args + SMOKE.get(args[0], []))
        assert result.exit_code == 0, f"{shlex.join(args)}\n{result.output}"
        printed.setdefault(args[0], []).append(result.output)
    from adapterkit.base import read_base_info

    info = read_base_info("builtin:tiny")
    recommended = info["training_defaults"]
    sampler = f"guidance {info['default_guidance']:g}, image guidance {info['default_image_guidance']:g}"
    for folder, method in (("adapters/derain", "lora"), ("adapters/cartoonize", "custom-diffusion")):
        training = json.load(open(tmp_path / folder / "adapter.json"))["training"]
        expected = {k: v for k, v in recommended[method].items() if k != "steps"}  # --steps 2 given by the smoke run
        assert training["recommended_by_base"] == expected
        assert all(training[k] == v for k, v in expected.items())
    assert all("settings recommended by builtin:tiny" in out for out in printed["train"])
    assert f"sampler: 2 steps, {sampler} (steps given; guidance, image guidance recorded by the base)" in printed["eval"][0]
    report = json.load(open(tmp_path / "report" / "report.json"))
    assert report["generation"]["guidance"] == info["default_guidance"] and report["generation"]["sampler_source"]["guidance"] == "base"
    for section in report["tasks"].values():  # 2 rows of 2 steps: retention is n/a unless the gain clears the noise
        view = section["merges"]["merged"]
        assert (view["psnr_retention"] is None) == (view["adapter_gain"]["ci95"][0] <= 0)
        if view["psnr_retention"] is None:  # the reason is in the table and report.html too
            assert view["note"] in printed["eval"][0]
            assert html.escape(view["note"]) in open(tmp_path / "report" / "report.html").read()
    assert f"{sampler} (steps given; guidance, image guidance recorded by the base)" in printed["edit"][0]
    assert os.path.isfile(tmp_path / "derained.png")


def _readme_pair(base):
    """Adapters storing the README's phrasings: derain (LoRA) and cartoonize (Custom Diffusion), five each."""
    from adapterkit.demo.tasks import get_task
    from adapterkit.testing import random_custom_diffusion, random_lora

    derain = random_lora(base, "derain", rank=2, seed=1, instructions=list(get_task("derain").instructions))
    cartoonize = random_custom_diffusion(base, "cartoonize", seed=2, instructions=list(get_task("cartoonize").instructions))
    return derain, cartoonize


def test_default_lsq_merges_the_readme_adapters_on_builtin_tiny():
    """Issue 18, point 4: builtin:tiny v2's text width (256) holds both adapters' end-of-text rows, so the default
    method, exact lsq, merges what the walk-through trains and keeps every stored phrasing's K/V outputs."""
    from adapterkit.base import load_base
    from adapterkit.merge import merge

    base = load_base("builtin:tiny")
    result = merge(list(_readme_pair(base)), base, "lsq", quiet=True)
    report = result.report
    assert report["method"] == "lsq" and report["d_text"] == 256 and 40 <= report["constraint_rows"] < 256
    assert all(task["residual"] < 1e-3 for task in report["tasks"]), report["tasks"]  # on the written float32 file


def test_default_lsq_refusal_names_each_adapters_rows_and_the_fix():
    """On a narrow text encoder (builtin:tiny v1, width 32) the same two adapters' 54 rows cannot all hold exactly:
    asked to keep every row (no row budget), the merge refuses naming each adapter's rows and the options that fix it;
    by default it solves the rows' top 12 principal combinations (3/8 of 32) instead."""
    from adapterkit.base import load_base
    from adapterkit.errors import AdapterkitError
    from adapterkit.merge import merge

    base = load_base(TINY_V1)
    derain, cartoonize = _readme_pair(base)
    with pytest.raises(AdapterkitError) as refused:
        merge([derain, cartoonize], base, "lsq", max_rows=1000)
    message = str(refused.value)
    assert "54 target token rows (derain 31 from 5 instructions, cartoonize 28 from 5 instructions;" in message
    assert "only 32 dimensions" in message and "pass a smaller --max-rows, --method lsq-soft" in message
    merge([derain, cartoonize], base, "lsq-soft")  # the options the message names do merge them
    report = merge([derain, cartoonize], base, "lsq").report
    assert report["constraint_rows"] == 54 and report["principal_rows"] == 12


@pytest.mark.slow  # ~4 min on one thread; bench/quickstart.py measures both methods at full size
def test_train_with_only_the_required_options_gains_2_db_on_builtin_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = lambda *args: CliRunner().invoke(main, list(args))  # noqa: E731
    assert run("demo-data", "--task", "cartoonize", "--output", "train", "--quiet").exit_code == 0
    assert run("demo-data", "--task", "cartoonize", "--split", "eval", "--rows", "16", "--output", "eval", "--quiet").exit_code == 0
    trained = run("train", "--base", "builtin:tiny", "--data", "train", "--method", "custom-diffusion", "--task",
                  "cartoonize", "--output", "cartoonize", "--quiet")
    assert trained.exit_code == 0, trained.output
    judged = run("eval", "--base", "builtin:tiny", "--data", "eval", "--adapter", "cartoonize", "--output", "report", "--quiet")
    assert judged.exit_code == 0, judged.output
    metrics = json.load(open(tmp_path / "report" / "report.json"))["tasks"]["cartoonize"]["metrics"]
    gain = metrics["cartoonize"]["psnr"]["mean"] - metrics["base"]["psnr"]["mean"]
    assert gain >= 2.0, judged.output
