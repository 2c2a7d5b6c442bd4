"""Eval columns: the base alone, each adapter, each merged adapter; their names, content hashes and the output cache.

Rules in eval/run.py's module docstring.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch
from PIL import Image

from ..adapters.record import Adapter, load_adapter
from ..errors import AdapterkitError
from ..fileio import atomic_file

CACHE_VERSION = 1
RESERVED_COLUMNS = ("input", "target", "base")


@dataclass
class Column:
    """One column of the report: the base alone, an adapter, or a merged adapter."""

    name: str  # label, also the folder name under images/<task>/
    kind: str  # "base" | "adapter" | "merge"
    adapter: Adapter | None
    tasks: list[str]  # tasks it is judged on
    content_hash: str  # hash of its weights ("base" for the base alone)


# ----------------------------------------------------------------------------------------------------- names
def safe_name(name: str) -> str:
    """A file-safe folder name: letters, digits, '.', '_', '-' kept; others become '_'; no leading dot."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return cleaned or "_"


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}-{n}", n + 1
    used.add(candidate)
    return candidate


# ---------------------------------------------------------------------------------------------------- hashing
def adapter_hash(adapter: Adapter) -> str:
    """sha256 of an adapter's method, its options and every tensor (name, shape, dtype, bytes)."""
    digest = hashlib.sha256()
    # The options go under the key "lora" (their name before Adapter.options): cache keys stay what they were.
    digest.update(json.dumps({"method": adapter.method, "lora": adapter.options}, sort_keys=True, default=str).encode())
    for name in sorted(adapter.tensors):
        _update_tensor(digest, name, adapter.tensors[name])
    for token in sorted(adapter.tokens or {}):  # modifier tokens change the edit too (adapters/tokens.py, issue 17)
        _update_tensor(digest, f"token.{token}", adapter.tokens[token])
    return digest.hexdigest()


def base_hash(pipe) -> str:
    """sha256 of every weight of the UNet, VAE and text encoder plus the scheduler config (cache key part).

    Computed on the pristine base, before any adapter is swapped in. The fingerprint alone covers only K/V.
    """
    digest = hashlib.sha256()
    digest.update(type(pipe.scheduler).__name__.encode())
    digest.update(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    for component in ("unet", "vae", "text_encoder"):
        for name, tensor in sorted(getattr(pipe, component).state_dict().items()):
            _update_tensor(digest, f"{component}.{name}", tensor)
    return digest.hexdigest()


def _update_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def image_hash(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


class OutputCache:
    """Generated images keyed by everything that decides them, as PNGs in one folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Image.Image | None:
        path = os.path.join(self.folder, f"{key}.png")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError):  # absent or unreadable: generate it again
            return None

    def put(self, key: str, image: Image.Image) -> None:
        with atomic_file(os.path.join(self.folder, f"{key}.png")) as f:
            image.save(f, format="PNG")


# ----------------------------------------------------------------------------------------------------- columns
def _merge_tasks(adapter: Adapter) -> list[str]:
    """Source task names of a merged adapter (its MergeRecord, adapter.json "merge")."""
    tasks = adapter.merge.source_tasks() if adapter.merge is not None else []
    if not tasks:
        raise AdapterkitError(
            f"merged adapter '{adapter.task}' lists no source tasks in adapter.json 'merge.sources'; re-run the merge "
            "or add the task names there"
        )
    return tasks


def build_columns(adapters: list) -> tuple[list[Column], list[str]]:
    """Columns (base first, then adapters, then merges) and the ordered task list."""
    loaded = [a if isinstance(a, Adapter) else load_adapter(a) for a in adapters]
    if not loaded:
        raise AdapterkitError("pass at least one adapter to evaluate (--adapter DIR)")
    used = set(RESERVED_COLUMNS)
    plain, merges, tasks = [], [], []
    for adapter in loaded:
        label = os.path.basename(os.path.normpath(adapter.path)) if adapter.path else adapter.task
        name = _unique(safe_name(label), used)
        if adapter.merge is not None:
            merges.append(Column(name, "merge", adapter, _merge_tasks(adapter), adapter_hash(adapter)))
        else:
            plain.append(Column(name, "adapter", adapter, [adapter.task], adapter_hash(adapter)))
            tasks.append(adapter.task)
    for column in merges:
        tasks.extend(column.tasks)
    tasks = list(dict.fromkeys(tasks))
    base = Column("base", "base", None, list(tasks), "base")
    return [base] + plain + merges, tasks
