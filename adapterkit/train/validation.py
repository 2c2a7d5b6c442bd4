"""Validation during training: edit the held-out rows with the current adapter and save one grid per step."""

from __future__ import annotations

import os

from ..fileio import atomic_file
from .checkpoints import VALIDATION


def validate(accelerator, unet, pipe, examples: list, synonyms: list[str], resolution: int, inference_steps: int,
             seed: int, output: str, step: int) -> str | None:
    """Edit the held-out `examples` with the current adapter; save OUTPUT/validation/step-N.png rows of
    input|target|output. `unet` is the prepared (maybe DDP-wrapped) UNet; the main process alone does this."""
    from PIL import Image

    from ..inference import run_pipeline

    if not examples:
        return None
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    size = resolution
    grid = Image.new("RGB", (3 * size, len(examples) * size), "white")
    try:
        with accelerator.autocast():
            for k, example in enumerate(examples):
                square = [center_square(img, size) for img in (example.input, example.target)]
                instruction = synonyms[0] if synonyms else example.instruction
                edited = run_pipeline(pipe, square[0], instruction, steps=inference_steps, seed=seed)
                for column, img in enumerate(square + [edited.resize((size, size))]):
                    grid.paste(img, (column * size, k * size))
    finally:
        unet.train()
    path = os.path.join(output, VALIDATION, f"step-{step}.png")
    with atomic_file(path) as f:
        grid.save(f, format="PNG")
    return path


def center_square(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))
