"""What an adapter is: one task's weights plus metadata, stored as a folder plain diffusers can load.

    derain/
      pytorch_custom_diffusion_weights.safetensors  or  pytorch_lora_weights.safetensors
      adapter.json   {"format": 1, "method", "task", "instructions", "base": {...}, "lora": {...}, "training", ...}
      README.md      model card

Nothing here knows a method: each lives in its own module with the same verbs (adapters/registry.py PROTOCOL), and
the record calls them through `adapter.module`. A folder written by diffusers' own training scripts has no
adapter.json: its method comes from the weight file's name, its task and instructions from the caller (Python:
`load_adapter(path, task=, instructions=)`; anywhere a folder is passed, also as `DIR::task=NAME::instruction=TEXT`,
see `parse_spec`), and `adapterkit import` (adopt.py) writes them into the folder for good. Modifier-token
embeddings (`<new1>.safetensors`, from train_custom_diffusion.py --modifier_token) belong to the adapter (tokens.py).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AdapterkitError
from ..fileio import atomic_folder, foreign_entries
from .registry import get_method, method_names

if TYPE_CHECKING:  # torch is imported where tensors are handled: `import adapterkit.adapters` stays light
    import torch

FORMAT_VERSION = 1
METADATA_FILE = "adapter.json"
COMMON_KEYS = ("format", "method", "task", "instructions", "base", "training", "metrics", "adapterkit_version", "tokens")
SPEC_SEPARATOR = "::"  # DIR::task=NAME::instruction=TEXT: per-adapter task and instructions wherever a folder is passed


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapterkit")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class Adapter:
    """One task's adapter. `tensors` are keyed as the method module documents; `options` are the method's own
    settings (LoRA: LoraConfig kwargs; Custom Diffusion: None), stored in adapter.json by the method."""

    method: str
    task: str
    instructions: list[str]
    tensors: dict[str, torch.Tensor]
    base: dict = field(default_factory=lambda: {"name_or_path": None, "fingerprint": None})
    options: dict | None = None  # the method's settings, e.g. {"r", "lora_alpha", "target_modules", ...} for LoRA
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # other adapter.json entries, e.g. "merge" (read it as .merge)
    path: str | None = None
    tokens: dict = field(default_factory=dict)  # modifier token -> (d_text,) embedding it owns (tokens.py)

    def __post_init__(self):
        get_method(self.method).check_options(self.options, self.task)

    @property
    def module(self):
        """The method module (adapters/registry.py): every method-specific step goes through it."""
        return get_method(self.method)

    @property
    def rank(self) -> int | None:
        return self.module.rank(self.tensors, self.options)

    @property
    def targets(self) -> list[str]:
        """Module paths this adapter changes."""
        return self.module.targets(self.tensors)

    @property
    def merge(self) -> MergeRecord | None:
        """How a merged adapter was made (adapter.json "merge"), or None for a trained one."""
        return MergeRecord.from_dict(self.extra["merge"]) if "merge" in self.extra else None

    def delta_weights(self, base_weights: dict[str, torch.Tensor] | None = None, dtype=None) -> dict[str, torch.Tensor]:
        """Module path -> dW (float32 unless `dtype`). Custom Diffusion needs the base's K/V weights to subtract."""
        import torch

        return self.module.delta_weights(self.tensors, base_weights, self.options, dtype or torch.float32)

    def check_base(self, base, force: bool = False) -> None:
        """Refuse a base with another fingerprint (unless force) or with any layer of another shape (always)."""
        recorded = (self.base or {}).get("fingerprint")
        if recorded and recorded != base.fingerprint and not force:
            raise AdapterkitError(
                f"adapter '{self.task}' was made for base {recorded} ({self.base.get('name_or_path')}) but this base "
                f"is {base.fingerprint} ({base.name_or_path}); use the same base, or --force to load it anyway"
            )
        self.module.check_shapes(self.tensors, base.unet)
        if self.tokens:
            from . import tokens

            tokens.check(self.tokens, base.pipe)


@dataclass
class MergeRecord:
    """Provenance of a merged adapter, as adapter.json stores it under "merge"."""

    method: str | None  # merge method name (merge/registry.py)
    sources: list  # per source: {"task", "path", "method", "instructions", "fingerprint", "weight"?} (older files: a path)
    options: dict = field(default_factory=dict)  # the merge's options as run
    report: dict = field(default_factory=dict)  # merge report (residuals, drift, ranks, timings)

    @classmethod
    def from_dict(cls, record: dict) -> MergeRecord:
        record = record or {}
        return cls(record.get("method"), list(record.get("sources") or []), record.get("options") or {}, record.get("report") or {})

    def to_dict(self) -> dict:
        return {"method": self.method, "sources": self.sources, "options": self.options, "report": self.report}

    def source_tasks(self) -> list[str]:
        """Task names of the sources, in order, without repeats. A source is a record with a task (or a path), or,
        in files of older versions, a path string: its folder's adapter.json task, else the folder name."""
        tasks = []
        for source in self.sources:
            if isinstance(source, dict):
                source = source.get("task") or source.get("path")
            if not isinstance(source, str) or not source:
                continue
            meta = os.path.join(source, METADATA_FILE)
            if os.path.isfile(meta):
                try:
                    with open(meta, encoding="utf-8") as f:
                        source = json.load(f).get("task") or source
                except (OSError, json.JSONDecodeError):
                    pass
            tasks.append(os.path.basename(os.path.normpath(source)) if ("/" in source or os.sep in source) else source)
        return list(dict.fromkeys(tasks))

    def source_instructions(self, task: str) -> list[str]:
        """The instructions a source of task `task` had, as recorded at merge time ([] when not recorded)."""
        for source in self.sources:
            if isinstance(source, dict) and source.get("task") == task and source.get("instructions"):
                return [str(i) for i in source["instructions"]]
        return []


def save_adapter(adapter: Adapter, path: str) -> str:
    """Write the adapter folder atomically: weights in diffusers' format, adapter.json, README.md model card."""
    module = adapter.module
    metadata = {
        "format": FORMAT_VERSION,
        "method": adapter.method,
        "task": adapter.task,
        "instructions": list(adapter.instructions),
        "base": dict(adapter.base),
        "training": adapter.training,
        "metrics": adapter.metrics,
        "adapterkit_version": _version(),
        **adapter.extra,
        **module.metadata(adapter.tensors, adapter.options),
        **({"tokens": sorted(adapter.tokens)} if adapter.tokens else {}),
    }
    with atomic_folder(path) as tmp:
        module.write(tmp, adapter.tensors, adapter.options)
        if adapter.tokens:
            from . import tokens

            tokens.write(tmp, adapter.tokens)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(adapter))
    adapter.path = path
    return path


def held_adapter(folder: str) -> tuple[str, str] | None:
    """(task, method) of the finished adapter `folder`/adapter.json describes; None when there is none or it is not ours."""
    try:
        with open(os.path.join(folder, METADATA_FILE), encoding="utf-8") as f:
            record = json.load(f)
        return (str(record["task"]), str(record["method"])) if isinstance(record, dict) else None
    except (OSError, ValueError, KeyError):
        return None


def _own_files(folder: str) -> frozenset:
    """What save_adapter (and an lsq merge) writes into an adapter folder: adapter.json, the model card, and
    safetensors / .bin files (weights, modifier tokens, merge constraints)."""
    return frozenset(n for n in os.listdir(folder) if n in (METADATA_FILE, "README.md") or n.endswith((".safetensors", ".bin")))


def check_replaceable(folder: str, task: str, method: str, overwrite: bool = False, kept=frozenset()) -> None:
    """Refuse, before any work, to write the (task, method) adapter where it would replace something else, unless
    `overwrite`: an adapter of another task or method, or files that are no adapter at all (session 21: a mistyped
    --output of train, merge or import replaced a finished adapter silently, a merge even one of its own sources, and
    `train --data data/derain --output data/derain` deleted the dataset when it published). The same task and method
    replace their own adapter (a rerun), unless files were added beside it (session 22: they went with the old
    adapter). An absent or empty folder, or one holding only the entries the writer keeps (`kept`: train's
    checkpoints/, validation/, logs/), is free."""
    if overwrite or not os.path.isdir(folder):
        return
    held = held_adapter(folder)
    if held == (task, method):
        added = foreign_entries(folder, frozenset(kept) | _own_files(folder))
        if added:
            raise AdapterkitError(
                f"{folder} holds files besides its {method} adapter '{task}' ({added}); writing the adapter again "
                "would delete them: move them out, choose another --output, or pass --overwrite"
            )
    elif held is None:
        shown = foreign_entries(folder, kept)
        if shown:
            raise AdapterkitError(
                f"{folder} holds files that are not an adapter ({shown}); writing the {method} adapter '{task}' there "
                "would delete them: choose another --output, or pass --overwrite"
            )
    else:  # another task or method
        raise AdapterkitError(
            f"{folder} already holds the {held[1]} adapter '{held[0]}'; writing the {method} adapter '{task}' there "
            "would replace it: choose another --output, or pass --overwrite"
        )


def _json_default(value):
    import torch

    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def infer_method(folder: str) -> str:
    """Method from the weight file's name, for folders written by diffusers' scripts (no adapter.json)."""
    modules = [get_method(name) for name in method_names()]
    found = [m.METHOD for m in modules for name in (m.FILE_NAME, m.LEGACY_FILE_NAME) if os.path.isfile(os.path.join(folder, name))]
    if not found:
        names = ", ".join(m.FILE_NAME for m in modules)
        raise AdapterkitError(f"{folder} has no adapter weight file (expected one of: {names})")
    if len(set(found)) > 1:
        raise AdapterkitError(f"{folder} holds weights of several methods ({' and '.join(dict.fromkeys(found))}); keep one method per folder")
    return found[0]


def parse_spec(spec: str) -> tuple[str, str | None, list[str]]:
    """`DIR::task=NAME::instruction=TEXT::instruction=TEXT` -> (DIR, NAME, [TEXT, ...]); a plain DIR -> (DIR, None, [])."""
    if SPEC_SEPARATOR not in spec or os.path.isdir(spec):
        return spec, None, []
    folder, *fields = spec.split(SPEC_SEPARATOR)
    task, instructions = None, []
    for entry in fields:
        key, sep, value = entry.partition("=")
        if not sep or key.strip() not in ("task", "instruction") or not value.strip():
            raise AdapterkitError(
                f"adapter '{spec}': '{entry}' is not task=NAME or instruction=TEXT; write DIR::task=NAME::instruction=TEXT"
            )
        if key.strip() == "task":
            task = value.strip()
        else:
            instructions.append(value.strip())
    return folder, task, instructions


def load_adapter(path: str, task: str | None = None, instructions: list[str] | None = None) -> Adapter:
    """Load an adapter folder (or a `DIR::task=NAME::instruction=TEXT` spec, see `parse_spec`). `task` and
    `instructions` (given here or in the spec) fill in what a folder without adapter.json lacks, or override it."""
    from . import tokens

    path, spec_task, spec_instructions = parse_spec(path)
    task, instructions = task or spec_task, instructions or spec_instructions or None
    if not os.path.isdir(path):
        raise AdapterkitError(f"adapter folder {path} does not exist")
    meta_path = os.path.join(path, METADATA_FILE)
    meta = _read_metadata(meta_path) if os.path.isfile(meta_path) else None
    if meta is None:
        method = infer_method(path)
        meta = {"method": method, "task": task or os.path.basename(os.path.normpath(path)), "instructions": instructions or []}
    method = meta["method"]
    if method not in method_names():
        raise AdapterkitError(f"{meta_path}: unknown adapter method '{method}'; use one of {', '.join(method_names())}")
    module = get_method(method)
    if not any(os.path.isfile(os.path.join(path, name)) for name in (module.FILE_NAME, module.LEGACY_FILE_NAME)):
        raise AdapterkitError(f"{path} has no adapter weight file (expected {module.FILE_NAME}); restore it or retrain")
    tensors, options = module.read(path)
    weight_files = {n for m in map(get_method, method_names()) for n in (m.FILE_NAME, m.LEGACY_FILE_NAME)}
    owned = tokens.read(path, weight_files)
    lost = [t for t in meta.get("tokens") or [] if t not in owned]
    if lost:
        raise AdapterkitError(f"{meta_path} lists modifier token '{lost[0]}' but {tokens.file_name(lost[0])} is missing; restore it")
    # Keys any method writes are not "extra": a format-1 file of one method may carry another's (e.g. "rank").
    known = set(COMMON_KEYS).union(*(get_method(name).METADATA_KEYS for name in method_names()))
    return Adapter(
        method=method,
        task=task or meta["task"],
        instructions=list(instructions) if instructions else list(meta.get("instructions") or []),
        tensors=tensors,
        base=meta.get("base") or {"name_or_path": None, "fingerprint": None},
        options=options,
        training=meta.get("training") or {},
        metrics=meta.get("metrics") or {},
        extra={k: v for k, v in meta.items() if k not in known},
        path=path,
        tokens=owned,
    )


def _read_metadata(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterkitError(f"{path} is not valid JSON ({e}); restore it or delete it and pass --task") from e
    if not isinstance(meta, dict):
        raise AdapterkitError(f"{path} must hold a JSON object")
    fmt = meta.get("format")
    if fmt != FORMAT_VERSION:
        raise AdapterkitError(
            f"{path} has format {fmt!r}; this adapterkit reads format {FORMAT_VERSION} (upgrade adapterkit or re-save)"
        )
    for key, kind in (("method", str), ("task", str), ("instructions", list)):
        if key not in meta:
            raise AdapterkitError(f"{path} lacks the field '{key}'")
        if not isinstance(meta[key], kind):
            raise AdapterkitError(f"{path}: field '{key}' must be a {kind.__name__}, got {type(meta[key]).__name__}")
    if not all(isinstance(i, str) for i in meta["instructions"]):
        raise AdapterkitError(f"{path}: every entry of 'instructions' must be a string")
    for key in ("base", "training", "metrics"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            raise AdapterkitError(f"{path}: field '{key}' must be an object, got {type(meta[key]).__name__}")
    return meta


def model_card(adapter: Adapter) -> str:
    """README.md for an adapter folder: what it does, code for plain diffusers that gives the same pixels as the
    `adapterkit edit` line beside it (same generator, steps and guidance), how it was made."""
    from ..inference import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS

    name = adapter.base.get("name_or_path") or "<the IP2P base it was trained on>"
    name = os.path.abspath(name) if os.path.isdir(name) else name  # the card's code runs in the adapter's folder
    instructions = "\n".join(f"- {i}" for i in adapter.instructions[:20]) or "- (none recorded)"
    what, load = adapter.module.card(adapter.tensors, adapter.options)
    training = adapter.training or {}
    summary = ", ".join(f"{k}={training[k]}" for k in ("steps", "learning_rate", "resolution", "batch_size", "final_loss") if k in training)
    instruction = adapter.instructions[0] if adapter.instructions else adapter.task
    token_lines = "".join(
        f"pipe.load_textual_inversion(folder, weight_name={_tokens_file(t)!r})  # modifier token {t}\n" for t in sorted(adapter.tokens)
    )
    tokens_note = (f"\nModifier token(s) {', '.join(sorted(adapter.tokens))} (train_custom_diffusion.py --modifier_token): "
                   "loaded with `load_textual_inversion` below.\n" if adapter.tokens else "")
    settings = f"num_inference_steps={DEFAULT_STEPS}, guidance_scale={DEFAULT_GUIDANCE}, image_guidance_scale={DEFAULT_IMAGE_GUIDANCE}"
    cli_settings = f"--steps {DEFAULT_STEPS} --guidance {DEFAULT_GUIDANCE:g} --image-guidance {DEFAULT_IMAGE_GUIDANCE:g} --seed 0"
    return (
        f"# {adapter.task} adapter for InstructPix2Pix\n\n"
        f"{what}. Made with adapterkit {_version()} on base `{name}` "
        f"(fingerprint `{adapter.base.get('fingerprint')}`).\n{tokens_note}\n"
        f"## Instructions it answers\n{instructions}\n\n"
        "## Load in plain diffusers\n"
        "Run it in this folder with the image to edit saved as `input.png`: it writes `edited.png`, the same pixels as "
        "the `adapterkit edit` line below.\n\n"
        "```python\nimport torch\nfrom PIL import Image\n"
        "from diffusers import StableDiffusionInstructPix2PixPipeline\n\n"
        "folder = \".\"  # this adapter's folder\n"
        f"{_base_line(name)}"
        f"{load}{token_lines}"
        "image = Image.open(\"input.png\").convert(\"RGB\")\n"
        "generator = torch.Generator(\"cpu\").manual_seed(0)  # adapterkit --seed 0\n"
        f"edited = pipe({instruction!r}, image=image, {settings}, generator=generator).images[0]\n"
        "edited.save(\"edited.png\")\n```\n\n"
        "## Load in adapterkit\n```bash\n"
        f"adapterkit edit --base {shlex.quote(name)} --adapter . input.png --instruction {shlex.quote(instruction)} "
        f"{cli_settings} --output edited.png\n```\n\n"
        f"## Training\n{summary or 'not recorded'}\n"
    )


def _tokens_file(token: str) -> str:
    from .tokens import file_name

    return file_name(token)


def _base_line(name: str) -> str:
    """The card's from_pretrained line. Built-in names mean nothing to plain diffusers: give a folder it can load."""
    from ..base import BUILTIN_TINY, BUILTIN_TINY_RANDOM, builtin_tiny_path

    load = "pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained({}, safety_checker=None, requires_safety_checker=False)\n"
    if name == BUILTIN_TINY:
        return ("# builtin:tiny is the base bundled with adapterkit; this is its folder in the install that wrote this card.\n"
                "# Elsewhere: python -c \"from adapterkit.base import builtin_tiny_path; print(builtin_tiny_path())\"\n"
                + load.format(repr(builtin_tiny_path())))
    if name == BUILTIN_TINY_RANDOM:
        return ("# builtin:tiny-random is built on the fly; write it as a folder first: adapterkit make-tiny-base --output tiny-random\n"
                + load.format(repr("tiny-random")))
    return load.format(repr(name))
