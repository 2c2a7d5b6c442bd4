"""What an adapter is: one task's weights plus metadata, stored as a folder plain diffusers can load.

    derain/
      pytorch_custom_diffusion_weights.safetensors  or  pytorch_lora_weights.safetensors
      adapter.json   {"format": 1, "method", "task", "instructions", "base": {...}, "lora": {...}, "training", ...}
      README.md      model card

Each method lives in its own module with the same verbs (make_trainable, extract, check_shapes, delta_weights,
read, write, fuse_into_base); METHODS is the registry. A folder written by diffusers' own training scripts has no
adapter.json: its method comes from the weight file's name, its task and instructions from the caller.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..errors import AdapterkitError
from ..fileio import atomic_folder
from . import custom_diffusion, lora

FORMAT_VERSION = 1
METADATA_FILE = "adapter.json"
METHODS = {custom_diffusion.METHOD: custom_diffusion, lora.METHOD: lora}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adapterkit")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class Adapter:
    """One task's adapter. `tensors` are keyed as the method module documents; `lora` is its LoraConfig kwargs."""

    method: str
    task: str
    instructions: list[str]
    tensors: dict[str, torch.Tensor]
    base: dict = field(default_factory=lambda: {"name_or_path": None, "fingerprint": None})
    lora: dict | None = None  # {"r", "lora_alpha", "target_modules", ...} for method "lora"
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. merge: {"sources": [...], "report": {...}}
    path: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise AdapterkitError(f"unknown adapter method '{self.method}'; use one of {', '.join(METHODS)}")
        if self.method == lora.METHOD and not self.lora:
            raise AdapterkitError(f"LoRA adapter '{self.task}' has no LoRA config (r, lora_alpha)")

    @property
    def module(self):
        return METHODS[self.method]

    @property
    def rank(self) -> int | None:
        if self.method != lora.METHOD:
            return None
        ranks = [v.shape[0] for k, v in self.tensors.items() if k.endswith("lora_A.weight")]
        return max(ranks) if ranks else int(self.lora["r"])

    @property
    def targets(self) -> list[str]:
        """Module paths this adapter changes."""
        if self.method == lora.METHOD:
            return lora.modules(self.tensors)
        return sorted(self.tensors)

    def delta_weights(self, base_weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Module path -> dW (float32). Custom Diffusion needs the base's K/V weights to subtract."""
        return self.module.delta_weights(self.tensors, base_weights, self.lora)

    def check_base(self, base, force: bool = False) -> None:
        """Refuse a base with another fingerprint (unless force) or with any layer of another shape (always)."""
        recorded = (self.base or {}).get("fingerprint")
        if recorded and recorded != base.fingerprint and not force:
            raise AdapterkitError(
                f"adapter '{self.task}' was made for base {recorded} ({self.base.get('name_or_path')}) but this base "
                f"is {base.fingerprint} ({base.name_or_path}); use the same base, or --force to load it anyway"
            )
        self.module.check_shapes(self.tensors, base.unet)


def save_adapter(adapter: Adapter, path: str) -> str:
    """Write the adapter folder atomically: weights in diffusers' format, adapter.json, README.md model card."""
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
    }
    if adapter.method == lora.METHOD:
        metadata["lora"] = adapter.lora
        metadata["rank"] = adapter.rank
        metadata["targets"] = adapter.lora["target_modules"]
    with atomic_folder(path) as tmp:
        if adapter.method == lora.METHOD:
            lora.write(tmp, adapter.tensors, adapter.lora)
        else:
            custom_diffusion.write(tmp, adapter.tensors)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(adapter))
    adapter.path = path
    return path


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def infer_method(folder: str) -> str:
    """Method from the weight file's name, for folders written by diffusers' scripts (no adapter.json)."""
    found = [m.METHOD for m in METHODS.values() for name in (m.FILE_NAME, m.LEGACY_FILE_NAME) if os.path.isfile(os.path.join(folder, name))]
    if not found:
        names = ", ".join(m.FILE_NAME for m in METHODS.values())
        raise AdapterkitError(f"{folder} has no adapter weight file (expected one of: {names})")
    if len(set(found)) > 1:
        raise AdapterkitError(f"{folder} holds both Custom Diffusion and LoRA weights; keep one method per folder")
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
    if method not in METHODS:
        raise AdapterkitError(f"{meta_path}: unknown adapter method '{method}'; use one of {', '.join(METHODS)}")
    module = METHODS[method]
    if not any(os.path.isfile(os.path.join(path, name)) for name in (module.FILE_NAME, module.LEGACY_FILE_NAME)):
        raise AdapterkitError(f"{path} has no adapter weight file (expected {module.FILE_NAME}); restore it or retrain")
    if method == lora.METHOD:
        tensors, config = lora.read(path)
    else:
        tensors, config = custom_diffusion.read(path), None
    known = {"format", "method", "task", "instructions", "base", "training", "metrics", "adapterkit_version", "lora", "rank", "targets"}
    return Adapter(
        method=method,
        task=task or meta["task"],
        instructions=list(instructions) if instructions else list(meta.get("instructions") or []),
        tensors=tensors,
        base=meta.get("base") or {"name_or_path": None, "fingerprint": None},
        lora=config,
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
    if adapter.method == lora.METHOD:
        load = (
            "pipe.load_lora_weights(\"path/to/this/folder\")\n"
        )
        what = f"LoRA (rank {adapter.rank}, alpha {adapter.lora['lora_alpha']}) on {len(adapter.targets)} UNet projections"
    else:
        load = (
            "from safetensors.torch import load_file\n"
            "sd = load_file(\"path/to/this/folder/pytorch_custom_diffusion_weights.safetensors\")\n"
            "modules = dict(pipe.unet.named_modules())\n"
            "for key, weight in sd.items():  # '<block>.attn2.processor.to_k_custom_diffusion.weight'\n"
            "    attn, name = key.split(\".processor.\")\n"
            "    proj = name.split(\"_custom_diffusion\")[0]  # to_k / to_v\n"
            "    modules[f\"{attn}.{proj}\"].weight.data.copy_(weight)\n"
            "# (unet.load_attn_procs ignores these weights in diffusers <= 0.42: diffusers#9320)\n"
        )
        what = f"Custom Diffusion: new cross-attention K/V weights for {len(adapter.tensors)} layers"
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
