"""TrainConfig: every setting of one training run, typed, validated, and saved in the adapter's adapter.json.

Sources, lowest priority first: the field defaults below, a TOML file (`--config`, keys are the field names), then
command-line flags. The CLI builds one flag per field from this file (`--learning-rate` for `learning_rate`), so
the help text of each field is also its `--help` line. This module imports nothing heavy: the CLI reads it at start.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field

from ..adapters.registry import method_names  # names only: the registry imports no torch
from ..errors import AdapterkitError

PRESETS = ("ip2p", "cartoonization", "low-level")  # column presets, defined in adapterkit/data/
OPTIMIZERS = ("adamw8bit", "adamw")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LOG_WITH = ("auto", "tensorboard", "none")
REQUIRED = ("base", "data", "method", "task", "output")


def _f(default, help: str, group: str, flag: str | None = None, choices: tuple | None = None):
    """A field whose metadata carries its --help line, its help section, and optionally another flag name."""
    return field(default=default, metadata={"help": help, "group": group, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults follow diffusers' train_instruct_pix2pix.py unless a comment says otherwise."""

    # ---- what to train (required)
    base: str | None = _f(None, "IP2P base: hub id, local diffusers folder, builtin:tiny or builtin:tiny-random.", "required")
    data: str | None = _f(None, "Dataset: hub id, datasets.save_to_disk folder, or folder with metadata.jsonl or metadata.csv.", "required")
    # choices is the registry's function, called when checked: a method registered at run time is accepted too.
    method: str | None = _f(None, "Adapter method.", "required", choices=method_names)
    task: str | None = _f(None, "Task name stored in the adapter (e.g. derain).", "required")
    output: str | None = _f(None, "Adapter folder to write; also holds checkpoints/, validation/ and logs/.", "required")

    # ---- data
    preset: str | None = _f(None, "Column preset; default: the first preset whose columns the dataset has.", "data", choices=PRESETS)
    input_column: str | None = _f(None, "Column of input images (overrides the preset).", "data")
    target_column: str | None = _f(None, "Column of edited (target) images (overrides the preset).", "data")
    instruction_column: str | None = _f(None, "Column of edit instructions (overrides the preset).", "data")
    split: str = _f("train", "Dataset split.", "data")
    data_task: str | None = _f(None, "Train only on rows of this task of a multi-task dataset (e.g. derain: rows naming it and no other known task; README, train).", "data")
    limit: int | None = _f(None, "Use at most this many rows (after --data-task).", "data")
    resolution: int | None = _f(None, "Training resolution (multiple of 8); default: the base's own, else 256.", "data")
    center_crop: bool = _f(False, "Center crop instead of IP2P's random crop (always on with --cache-latents).", "data")
    random_flip: bool = _f(True, "Random horizontal flip, the same for input and target.", "data")
    instructions: tuple[str, ...] = _f((), "Instruction synonym (repeatable); one is sampled per example per step instead of the column.", "data", flag="instruction")
    instructions_file: str | None = _f(None, "File of instruction synonyms, one per line (joins --instruction).", "data", flag="instructions")
    max_skipped_fraction: float = _f(0.1, "Stop with an error once more than this fraction of rows had unreadable images.", "data")
    cache_latents: bool | None = _f(None, "Encode every row once (VAE latents, text features) before training: for small datasets. "
                                    "Default: the base's recommendation, else off.", "data")

    # ---- adapter
    rank: int | None = _f(None, "LoRA rank r. Default: the base's recommendation, else 4.", "adapter")
    lora_alpha: float | None = _f(None, "LoRA alpha; default: equal to the rank (scale 1).", "adapter")
    kv_preservation: float | None = _f(None, "Weight of K/V preservation: the relative change of the attn2 K/V outputs on "
                                       "other prompts (the merge's regularization prompts) is added to the loss, so the adapter "
                                       "acts through its own instructions, leaves the base's other edits alone and merges "
                                       "without conflict (README). Default: the base's recommendation, else 0 (off).", "adapter")
    targets: str = _f("kv", "LoRA target modules: kv (attn2 K/V, mergeable), attn (all attention projections), or a comma list.", "adapter")

    # ---- optimisation
    steps: int | None = _f(None, "Optimizer steps. Default: the base's recommendation, else 1000.", "optimisation")
    batch_size: int | None = _f(None, "Examples per process per micro-step. Default: the base's recommendation, else 4.", "optimisation")
    gradient_accumulation: int = _f(1, "Micro-steps per optimizer step.", "optimisation")
    learning_rate: float | None = _f(None, "Peak learning rate. Default: the base's recommendation, else 1e-4.", "optimisation")
    lr_scheduler: str | None = _f(None, "Learning-rate schedule (diffusers.optimization). Default: the base's "
                                  "recommendation, else constant.", "optimisation", choices=LR_SCHEDULERS)
    warmup_steps: int = _f(0, "Linear warm-up steps (schedules with warm-up).", "optimisation")
    optimizer: str | None = _f(None, "adamw8bit (bitsandbytes, 8-bit states) or adamw (torch, fp32 states). Default: the "
                               "base's recommendation, else adamw8bit.", "optimisation", choices=OPTIMIZERS)
    # 0, not diffusers' 1e-2: AdamW decays toward zero, and Custom Diffusion trains full K/V weights, not deltas.
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay.", "optimisation")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0: no clipping).", "optimisation")
    mixed_precision: str = _f("no", "Autocast precision; fp16 needs a GPU. Frozen weights are stored in it (trainable ones stay fp32).", "optimisation", choices=MIXED_PRECISION)
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in backward: less memory, ~30% slower.", "optimisation")
    conditioning_dropout: float = _f(0.05, "IP2P conditioning dropout p: drop text only, image only, and both, each with probability p.", "optimisation")
    seed: int = _f(0, "Seed of data order, augmentation, noise, dropout and LoRA init.", "optimisation")

    # ---- loop
    validation_steps: int = _f(500, "Edit held-out inputs every N steps and at the end (0: never).", "loop")
    validation_rows: int = _f(4, "Rows held out of training for validation (when validation_steps > 0).", "loop")
    validation_inference_steps: int = _f(20, "Denoising steps of validation edits.", "loop")
    checkpoint_steps: int = _f(500, "Save a resumable checkpoint every N steps (0: never).", "loop")
    checkpoints_total_limit: int = _f(2, "Keep only the newest N checkpoints (0: keep all).", "loop")
    resume: str | None = _f(None, "Continue from a checkpoint: latest (newest in OUTPUT/checkpoints) or a checkpoint folder.", "loop")
    log_with: str = _f("auto", "Tracker: tensorboard (logs in OUTPUT/logs), none, or auto (tensorboard when installed).", "loop", choices=LOG_WITH)
    overwrite: bool = _f(False, "Replace an adapter of another task or method already in OUTPUT (retraining the same task and method replaces its own without this).", "loop")
    cpu: bool = _f(False, "Train on CPU even when a GPU is available.", "loop")
    quiet: bool = _f(False, "No progress bar.", "loop")

    def __post_init__(self):
        missing = [name for name in REQUIRED if getattr(self, name) in (None, "")]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise AdapterkitError(f"missing required setting(s) {flags}; pass them as flags or in the --config file")
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), HINTS[f.name])
            if float in typing.get_args(HINTS[f.name]) + (HINTS[f.name],) and isinstance(getattr(self, f.name), int):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))  # TOML `learning_rate = 1` -> 1.0
            choices = f.metadata.get("choices")
            choices = choices() if callable(choices) else choices
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise AdapterkitError(f"{_flag(f)} must be one of {', '.join(choices)}, got '{getattr(self, f.name)}'")
        self._check_ranges()

    def _check_ranges(self) -> None:
        positive = ("steps", "batch_size", "gradient_accumulation", "rank", "validation_rows", "validation_inference_steps")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise AdapterkitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "validation_steps", "checkpoint_steps", "checkpoints_total_limit", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise AdapterkitError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.kv_preservation is not None and not self.kv_preservation >= 0:
            raise AdapterkitError(f"--kv-preservation must not be negative, got {self.kv_preservation}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise AdapterkitError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise AdapterkitError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.warmup_steps and self.lr_scheduler == "constant":  # None: decided by resolved(), which checks again
            raise AdapterkitError("--warmup-steps needs a schedule with warm-up: pass --lr-scheduler constant_with_warmup (or linear, cosine)")
        if self.limit is not None and self.limit < 1:
            raise AdapterkitError(f"--limit must be at least 1, got {self.limit}")
        # One uniform r per example: text dropped for r < 2p, image for p <= r < 3p, so 3p must fit in [0, 1].
        if not 0 <= self.conditioning_dropout <= 1 / 3:
            raise AdapterkitError(f"--conditioning-dropout must be in [0, 1/3] (three cases of probability p), got {self.conditioning_dropout}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise AdapterkitError(f"--max-skipped-fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise AdapterkitError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if any(not i.strip() for i in self.instructions):
            raise AdapterkitError("--instruction must not be empty")
        if not self.task.strip() or os.sep in self.task:
            raise AdapterkitError(f"--task must be a plain name such as derain, got '{self.task}'")

    # ------------------------------------------------------------------------------------------------ sources
    @classmethod
    def from_toml(cls, path: str, **overrides) -> TrainConfig:
        """Read a TOML file (keys = field names; unknown keys rejected), then apply `overrides` (None = not given)."""
        return cls.from_sources(path, overrides)

    @classmethod
    def from_sources(cls, config_path: str | None = None, overrides: dict | None = None) -> TrainConfig:
        values = _read_toml(config_path) if config_path else {}
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        _reject_unknown(given, "option")
        return cls(**{**values, **given})

    def replace(self, **changes) -> TrainConfig:
        _reject_unknown(changes, "option")
        return dataclasses.replace(self, **changes)

    def resolved(self, base_info: dict, base_file: str = "adapterkit_base.json") -> tuple[TrainConfig, dict]:
        """(this config with every setting left at None filled in, {setting: value} of those the base recommended).

        Issue 18: the plain defaults (diffusers' script's) learn almost nothing on a tiny base in minutes, so a base
        may record per method the settings it was tuned to train with (`training_defaults` in adapterkit_base.json);
        they fill only what neither a flag nor a --config file set. Everything else gets PLAIN_DEFAULTS.
        """
        recommended = recommended_settings(base_info, self.method, base_file)
        from_base = {k: v for k, v in recommended.items() if getattr(self, k) is None}
        plain = {k: v for k, v in PLAIN_DEFAULTS.items() if getattr(self, k) is None and k not in from_base}
        return dataclasses.replace(self, **from_base, **plain), from_base

    def to_dict(self) -> dict:
        """Plain JSON/TOML types (tuples become lists), in field order."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}


# Settings a TrainConfig may leave at None ("not given"): the base's recommendation fills them, else these
# (diffusers' train_instruct_pix2pix.py values, with bitsandbytes' 8-bit AdamW).
PLAIN_DEFAULTS = {"steps": 1000, "batch_size": 4, "learning_rate": 1e-4, "lr_scheduler": "constant", "rank": 4,
                  "optimizer": "adamw8bit", "cache_latents": False, "kv_preservation": 0.0}
BASE_TRAINING_KEY = "training_defaults"  # in adapterkit_base.json: {method: {setting: value}}


def recommended_settings(base_info: dict, method: str, base_file: str = "adapterkit_base.json") -> dict:
    """The settings a base recommends for `method` ({} when it records none); unknown settings are refused."""
    table = base_info.get(BASE_TRAINING_KEY) or {}
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise AdapterkitError(f"{base_file}: '{BASE_TRAINING_KEY}' must map each method to an object of settings")
    settings = dict(table.get(method, {}))
    unknown = [k for k in settings if k not in PLAIN_DEFAULTS]
    if unknown:
        raise AdapterkitError(f"{base_file}: '{BASE_TRAINING_KEY}.{method}' sets {', '.join(unknown)}; a base may "
                              f"recommend only {', '.join(PLAIN_DEFAULTS)}")
    return settings


def describe_recommended(from_base: dict, base: str) -> str:
    """The line train prints: 'settings recommended by builtin:tiny for options not given: rank 32, ...'."""
    shown = lambda v: ("on" if v else "off") if isinstance(v, bool) else v  # noqa: E731
    values = ", ".join(f"{k.replace('_', ' ')} {shown(v)}" for k, v in from_base.items())
    return f"settings recommended by {base} (its adapterkit_base.json) for options not given: {values}"


HINTS = typing.get_type_hints(TrainConfig)  # field -> its type: the CLI builds each flag's type from it
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _flag(f) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _read_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise AdapterkitError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AdapterkitError(f"config file {path} is not valid TOML ({e})") from e
    _reject_unknown(values, f"key in {path}")
    if isinstance(values.get("instructions"), list):
        values["instructions"] = tuple(values["instructions"])
    return values


def _reject_unknown(values: dict, what: str) -> None:
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(FIELDS)}"
            raise AdapterkitError(f"unknown {what} '{key}'{hint}")


def _check_type(name: str, value, hint) -> None:
    """Check one value against its annotation (str, int, float, bool, tuple[str, ...], each maybe Optional)."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if kind is str and isinstance(value, str):
            return
        if typing.get_origin(kind) is tuple and isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return
    expected = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise AdapterkitError(f"setting '{name}' must be {expected}, got {type(value).__name__} {value!r}")
