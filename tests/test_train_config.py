"""TrainConfig: validation, TOML files (unknown keys rejected), flags over the file, and `adapterkit train --help`."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.train import TrainConfig
from adapterkit.train.config import FIELDS

REQUIRED = {"base": "builtin:tiny-random", "data": "data", "method": "lora", "task": "derain", "output": "out"}


def test_defaults_are_valid_and_frozen():
    cfg = TrainConfig(**REQUIRED)
    assert cfg.optimizer is None and cfg.conditioning_dropout == 0.05 and cfg.mixed_precision == "no"  # None: not given
    plain, from_base = cfg.resolved({})  # a base that recommends nothing: the plain defaults
    assert from_base == {} and plain.optimizer == "adamw8bit" and plain.steps == 1000 and plain.rank == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"method": "dreambooth"}, "--method must be one of"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"resolution": 100}, "multiple of 8"),
        ({"conditioning_dropout": 0.5}, "[0, 1/3]"),
        ({"learning_rate": -1.0}, "--learning-rate must be positive"),
        ({"optimizer": "sgd"}, "--optimizer must be one of"),
        ({"mixed_precision": "fp8"}, "--mixed-precision must be one of"),
        ({"steps": "10"}, "must be int"),
        ({"task": ""}, "--task"),
        ({"warmup_steps": 10, "lr_scheduler": "constant"}, "--lr-scheduler constant_with_warmup"),
    ],
)
def test_bad_values_name_the_option(changes, words):
    with pytest.raises(AdapterkitError, match=None) as info:
        TrainConfig(**{**REQUIRED, **changes})
    assert words in str(info.value)


def test_missing_required_lists_the_flags():
    with pytest.raises(AdapterkitError, match="--data, --method"):
        TrainConfig(base="b", task="t", output="o")


def test_toml_file_then_flags_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'base = "builtin:tiny-random"\ndata = "d"\nmethod = "custom-diffusion"\ntask = "derain"\noutput = "o"\n'
        'learning_rate = 1\nsteps = 7\ninstructions = ["derain it", "remove the rain"]\n'
    )
    cfg = TrainConfig.from_toml(str(path), steps=9, seed=None)
    assert cfg.steps == 9  # flag wins
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # TOML int accepted for a float
    assert cfg.instructions == ("derain it", "remove the rain")
    assert cfg.seed == 0  # None means "flag not given"
    assert cfg.to_dict()["instructions"] == ["derain it", "remove the rain"]


def test_toml_unknown_key_rejected_with_suggestion(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('base = "b"\nlearning_rat = 0.1\n')
    with pytest.raises(AdapterkitError, match="unknown key in .*'learning_rat'; did you mean 'learning_rate'"):
        TrainConfig.from_toml(str(path))


def test_toml_syntax_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("base = \n")
    with pytest.raises(AdapterkitError, match="not valid TOML"):
        TrainConfig.from_toml(str(path))


def test_help_explains_every_option_with_its_default():
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for name, field in FIELDS.items():
        flag = "--" + (field.metadata["flag"] or name).replace("_", "-")
        assert flag in text, flag
        if field.default not in (None, ()) and field.metadata["group"] != "required":
            assert f"[default: {field.default}]" in text, name
    assert "--config" in text and "[required]" in text


def test_cli_errors_exit_2_with_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--base", "b", "--data", "d", "--method", "lora", "--task", "t"])
    assert result.exit_code == 2
    assert "missing required setting(s) --output" in result.output
    (tmp_path / "c.toml").write_text("stepz = 3\n")
    result = runner.invoke(main, ["train", "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 2 and "did you mean 'steps'" in result.output


def test_repeated_instruction_flags_reach_the_config(monkeypatch):
    import sys

    seen = {}

    def fake_train(cfg):  # stands in for the training loop: only the parsed config matters here
        seen["cfg"] = cfg
        raise AdapterkitError("stop here")

    monkeypatch.setattr(sys.modules["adapterkit.train"], "train", fake_train)
    args = ["train", *sum((["--" + k, v] for k, v in REQUIRED.items()), []), "--instruction", "derain it", "--instruction", "remove the rain"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["cfg"].instructions == ("derain it", "remove the rain")


def test_base_recommendations_fill_only_settings_not_given_issue_18(tmp_path):
    """A base's training_defaults (per method) fill what no flag or --config key set; the rest stays plain."""
    from adapterkit.base import read_base_info

    info = read_base_info("builtin:tiny")
    lora, cd = info["training_defaults"]["lora"], info["training_defaults"]["custom-diffusion"]
    cfg, from_base = TrainConfig(**{**REQUIRED, "base": "builtin:tiny"}, steps=7).resolved(info)
    assert cfg.steps == 7 and "steps" not in from_base  # given: kept
    assert cfg.rank == lora["rank"] == from_base["rank"] and cfg.batch_size == lora["batch_size"]
    assert cfg.learning_rate == lora["learning_rate"] and cfg.cache_latents is lora["cache_latents"]
    cfg, from_base = TrainConfig(**{**REQUIRED, "base": "builtin:tiny", "method": "custom-diffusion"}).resolved(info)
    assert from_base == cd and cfg.rank == 4  # custom-diffusion recommends no rank: the plain default
    toml = tmp_path / "run.toml"
    toml.write_text("learning_rate = 0.5\n")
    cfg, from_base = TrainConfig.from_sources(str(toml), {**REQUIRED, "method": "lora"}).resolved(info)
    assert cfg.learning_rate == 0.5 and "learning_rate" not in from_base  # a --config key counts as given
    with pytest.raises(AdapterkitError, match="--lr-scheduler constant_with_warmup"):  # checked once resolved
        TrainConfig(**REQUIRED, warmup_steps=10).resolved({})
    with pytest.raises(AdapterkitError, match="may recommend only"):
        TrainConfig(**REQUIRED).resolved({"training_defaults": {"lora": {"warmup_steps": 3}}})
    with pytest.raises(AdapterkitError, match="--lr-scheduler must be one of"):
        TrainConfig(**REQUIRED).resolved({"training_defaults": {"lora": {"lr_scheduler": "wild"}}})
