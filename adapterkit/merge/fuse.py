"""Writing a base with an adapter fused in as a full diffusers pipeline (`adapterkit merge --fuse --output-pipeline`)."""

from __future__ import annotations

import json
import os

import torch

from ..adapters import tokens
from ..adapters.record import Adapter
from ..base import BASE_INFO_FILE, Base, local_folder, unwrap_peft
from ..fileio import atomic_folder, check_pipeline_replaceable

FUSED_BY = "adapterkit merge --fuse"  # the made_by of a fused pipeline's adapterkit_base.json


def check_fused_output(output: str, base: Base, overwrite: bool = False) -> None:
    """Refuse, before any work, an `output` that is the base itself (every adapter made for it would stop loading) or
    that holds anything but an earlier fused pipeline, unless `overwrite` (fileio.check_pipeline_replaceable)."""
    check_pipeline_replaceable(output, FUSED_BY, "the fused pipeline", overwrite,
                               reads=(local_folder(base.name_or_path),), option="--output-pipeline")


def fuse_into_pipeline(base: Base, adapter: Adapter, output: str, overwrite: bool = False) -> str:
    """Write `base` with `adapter` fused in as a full diffusers pipeline; the live base is restored afterwards. An
    `output` that is the base or holds anything but an earlier fused pipeline is refused unless `overwrite`."""
    check_fused_output(output, base, overwrite)
    unet = base.unet
    named = dict(unet.named_modules())
    touched = adapter.targets
    saved = {}
    for name in touched:
        saved[name] = unwrap_peft(named[name]).weight.detach().clone()
    try:
        adapter.module.fuse_into_base(unet, adapter.tensors, adapter.options)
        with atomic_folder(output) as tmp, tokens.applied(base.pipe, adapter.tokens):  # tokenizer + text encoder hold them
            base.pipe.save_pretrained(tmp)
            info = {**base.info, "resolution": base.resolution, "made_by": FUSED_BY, "merged": adapter.merge.sources if adapter.merge else []}
            with open(os.path.join(tmp, BASE_INFO_FILE), "w", encoding="utf-8") as f:
                json.dump(info, f, indent=2, default=str)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                unwrap_peft(named[name]).weight.copy_(weight)
    return output
