"""Incremental merging: a least-squares merge stores what a later merge needs, so `merge(merged, new)` adds a task
without the original source folders and equals merging every task from scratch.

A merged adapter's folder holds `merge_constraints.safetensors`: per source task its constraint rows C_i
(k_i, d_text) and its K/V outputs there, dW_i C_i^T (d_out, k_i) per layer, both float64 (the text features are
float32 values, so the rows are stored exactly; targets in float64 keep incremental == from scratch to rounding).
Size: (d_text + sum of K/V d_out) * 8 bytes per constraint row: 7.4 KB per row on builtin:tiny v1 (14 K/V layers, sum d_out 896) (a task with
one short instruction brings ~4 rows), 206 KB per row on SD1.5 (32 K/V layers, sum d_out 24,960). The metadata names the position rule and a probe of the text encoder the rows came from; a
merge with another rule or text encoder is refused (the stored rows would not be the ones the base now gives).

A later merge expands such an adapter back into its source tasks (`expand`): their rows and targets are exactly
the inputs a from-scratch merge would build, so shared rows, weights and the solve come out the same.
"""

from __future__ import annotations

import json
import os
import weakref

import torch
from safetensors.torch import save as safetensors_bytes

from ..adapters import tokens
from ..adapters.safe_load import load_safetensors
from ..errors import AdapterkitError
from ..fileio import atomic_file
from .lsq import TaskRows

CONSTRAINTS_FILE = tokens.MERGE_CONSTRAINTS_FILE  # adapters/tokens.py must know it is not a token file
FORMAT = 1
# In-memory copies for merged Adapter objects not read from a folder: id -> (weak reference, packed). Not an attribute
# on the Adapter, whose fields other code copies by __dict__.
_MEMORY: dict[int, tuple] = {}


def pack(tasks: list[TaskRows], positions: str, text_encoder: str, source_drifts: list[float | None]) -> tuple[dict, dict]:
    """(tensors, metadata) describing every task of a merge."""
    tensors, described = {}, []
    for t, (task, drift) in enumerate(zip(tasks, source_drifts)):
        tensors[f"task.{t}.rows"] = task.rows.to(torch.float64).contiguous()
        for layer, target in task.targets.items():
            tensors[f"task.{t}.target.{layer}"] = target.to(torch.float64).contiguous()
        described.append({"task": task.task, "texts": task.texts, "source_drift": drift})
    meta = {"format": FORMAT, "positions": positions, "text_encoder": text_encoder, "tasks": described}
    return tensors, {"adapterkit": json.dumps(meta)}


def attach(adapter, packed: tuple[dict, dict]) -> None:
    key = id(adapter)
    _MEMORY[key] = (weakref.ref(adapter), packed)
    weakref.finalize(adapter, _MEMORY.pop, key, None)


def write(folder: str, packed: tuple[dict, dict]) -> None:
    tensors, metadata = packed
    with atomic_file(os.path.join(folder, CONSTRAINTS_FILE)) as f:
        f.write(safetensors_bytes(tensors, metadata=metadata))


def _read(adapter) -> tuple[dict, dict] | None:
    entry = _MEMORY.get(id(adapter))
    if entry is not None and entry[0]() is adapter:
        return entry[1]
    path = os.path.join(adapter.path, CONSTRAINTS_FILE) if adapter.path else None
    if not path or not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return load_safetensors(path), metadata


def expand(adapter, positions: str, text_encoder: str) -> tuple[list[TaskRows], list[float | None]] | None:
    """The source tasks a merged adapter stored (rows, targets, source drifts), or None when it stored none."""
    packed = _read(adapter)
    if packed is None:
        return None
    tensors, metadata = packed
    try:
        meta = json.loads(metadata["adapterkit"])
        described = meta["tasks"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AdapterkitError(f"{adapter.path or adapter.task}: {CONSTRAINTS_FILE} has no readable metadata; "
                              "merge from the source adapters instead") from e
    if meta.get("positions") != positions:
        raise AdapterkitError(f"merged adapter {adapter.task} stores constraint rows for --positions {meta.get('positions')}; "
                              f"merge with --positions {meta.get('positions')}, or from the source adapters")
    if meta.get("text_encoder") != text_encoder:
        raise AdapterkitError(f"merged adapter {adapter.task} was made with another text encoder (its stored rows differ "
                              "from this base's); merge from the source adapters instead")
    tasks = []
    for t, entry in enumerate(described):
        prefix = f"task.{t}.target."
        targets = {k[len(prefix):]: v.double() for k, v in tensors.items() if k.startswith(prefix)}
        tasks.append(TaskRows(entry["task"], list(entry["texts"]), tensors[f"task.{t}.rows"].double(), targets))
    return tasks, [entry.get("source_drift") for entry in described]
