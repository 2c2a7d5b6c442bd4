"""What an adapter is: one task's weights plus metadata, stored as a folder plain diffusers can load.

    derain/
      pytorch_custom_diffusion_weights.safetensors  or  pytorch_lora_weights.safetensors
      adapter.json   {"format": 1, "method", "task", "instructions", "base": {...}, "lora": {...}, "training", ...}
      README.md      model card

Nothing here knows a method: each lives in its own module with the same verbs (adapters/registry.py PROTOCOL), and
the record calls them through `adapter.module`. A folder written by diffusers' own training scripts has no
adapter.json: its method comes from the weight file's name, its task and instructions from the caller.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import AdapterkitError
from ..fileio import atomic_folder
from .registry import get_method, method_names

if TYPE_CHECKING:  # torch is imported where tensors are handled: `import adapterkit.adapters` stays light
    import torch

FORMAT_VERSION = 1
METADATA_FILE = "adapter.json"
COMMON_KEYS = ("format", "method", "task", "instructions", "base", "training", "metrics", "adapterkit_version")


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
    }
    with atomic_folder(path) as tmp:
        module.write(tmp, adapter.tensors, adapter.options)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(adapter))
    adapter.path = path
    return path


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


def load_adapter(path: str, task: str | None = None, instructions: list[str] | None = None) -> Adapter:
    """Load an adapter folder. `task`/`instructions` fill in (or override) what adapter.json says."""
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
    """README.md for an adapter folder: what it does, how to load it in plain diffusers, how it was made."""
    base = adapter.base.get("name_or_path") or "<the IP2P base it was trained on>"
    instructions = "\n".join(f"- {i}" for i in adapter.instructions[:20]) or "- (none recorded)"
    what, load = adapter.module.card(adapter.tensors, adapter.options)
    training = adapter.training or {}
    summary = ", ".join(f"{k}={training[k]}" for k in ("steps", "learning_rate", "resolution", "batch_size", "final_loss") if k in training)
    return (
        f"# {adapter.task} adapter for InstructPix2Pix\n\n"
        f"{what}. Made with adapterkit {_version()} on base `{base}` "
        f"(fingerprint `{adapter.base.get('fingerprint')}`).\n\n"
        f"## Instructions it answers\n{instructions}\n\n"
        "## Load in plain diffusers\n```python\nimport torch\n"
        "from diffusers import StableDiffusionInstructPix2PixPipeline\n"
        f"pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(\"{base}\")\n"
        f"{load}"
        f"image = pipe(\"{adapter.instructions[0] if adapter.instructions else adapter.task}\", image=input_image, "
        "num_inference_steps=20, guidance_scale=7, image_guidance_scale=1.5).images[0]\n```\n\n"
        "## Load in adapterkit\n```\n"
        f"adapterkit edit --base {base} --adapter path/to/this/folder IMAGE --instruction \"...\" --output out.png\n```\n\n"
        f"## Training\n{summary or 'not recorded'}\n"
    )
