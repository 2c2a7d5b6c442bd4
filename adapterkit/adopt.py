"""`adapterkit import`: adopt an adapter folder written elsewhere, e.g. by diffusers' own training scripts.

diffusers' train_instruct_pix2pix_lora.py / train_text_to_image_lora.py write `pytorch_lora_weights.safetensors`;
train_custom_diffusion.py writes `pytorch_custom_diffusion_weights.safetensors` (or `.bin`) and, with
`--modifier_token`, `<new1>.safetensors` (or `.bin`). None of them records a task, instructions or a base. `adopt`
reads the folder, checks every tensor against the base (layers, shapes, the text width of modifier tokens, the
recorded fingerprint if any), and writes an adapterkit folder: the same weights in diffusers' format, adapter.json
with the task, instructions and base fingerprint, and a model card. The source folder is left as it is.
"""

from __future__ import annotations

import os

from .adapters.record import Adapter, check_replaceable, load_adapter, save_adapter
from .base import Base, load_base
from .errors import AdapterkitError


def adopt(folder: str, base, task: str, instructions: list[str], output: str, force: bool = False,
          overwrite: bool = False) -> Adapter:
    """Check the adapter in `folder` against `base` (a Base or a name for load_base) and write it to `output`
    with `task` and `instructions`; returns the adapter as saved. An `output` holding an adapter of another task or
    method is refused unless `overwrite` (record.check_replaceable)."""
    instructions = [i.strip() for i in instructions if i and i.strip()]
    if not task or not task.strip():
        raise AdapterkitError("--task must name the task, e.g. --task derain")
    if not instructions:
        raise AdapterkitError("pass at least one --instruction (what users type to invoke the task); routing and lsq merges use them")
    if os.path.abspath(output) == os.path.abspath(folder):
        raise AdapterkitError(f"--output {output} is the source folder; write the adopted adapter to another folder")
    if not os.path.isdir(folder):
        raise AdapterkitError(f"adapter folder {folder} does not exist")
    adapter = load_adapter(folder, task=task.strip(), instructions=instructions)
    check_replaceable(output, adapter.task, adapter.method, overwrite)  # before the base load
    base = base if isinstance(base, Base) else load_base(base)
    adapter.check_base(base, force=force)  # fingerprint when recorded, every layer's shape, token widths
    previous = (adapter.base or {}).get("fingerprint")
    adapter.base = {"name_or_path": base.name_or_path, "fingerprint": base.fingerprint}
    adapter.extra = {**adapter.extra, "imported": {
        "from": os.path.abspath(folder),
        "files": sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))),
        **({"recorded_fingerprint": previous} if previous and previous != base.fingerprint else {}),
    }}
    save_adapter(adapter, output)
    return adapter


def describe(adapter: Adapter) -> str:
    """One line for the CLI: what was adopted and where it went."""
    tokens = f", modifier token(s) {', '.join(sorted(adapter.tokens))}" if adapter.tokens else ""
    return (f"{adapter.method} adapter '{adapter.task}' ({len(adapter.targets)} modules{tokens}, "
            f"{len(adapter.instructions)} instruction(s)) checked against base {adapter.base['fingerprint']} -> {adapter.path}")
