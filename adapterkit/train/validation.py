"""Validation during training: edit the held-out rows with the current adapter and save one grid per step."""

from __future__ import annotations

import os

from ..fileio import atomic_file
from .checkpoints import VALIDATION

COLUMNS = ("input", "target", "output")  # left to right in every validation grid


def label_height(size: int) -> int:
    """Pixels of the header strip naming the columns above a grid of `size`-pixel cells."""
    return _font_size(size) + 4


def _font_size(size: int) -> int:
    return max(8, min(14, size // 4))  # "output" at 8 px is 24 px wide: fits a 32 px cell


def validate(accelerator, unet, pipe, examples: list, synonyms: list[str], resolution: int, inference_steps: int,
             seed: int, output: str, step: int) -> str | None:
    """Edit the held-out `examples` with the current adapter; save OUTPUT/validation/step-N.png: a header naming the
    columns, then one row per example of input | target | output. `unet` is the prepared (maybe DDP-wrapped) UNet;
    the main process alone does this."""
    from PIL import Image, PngImagePlugin

    from ..inference import run_pipeline

    if not examples:
        return None
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    size = resolution
    top = label_height(size)
    grid = Image.new("RGB", (3 * size, top + len(examples) * size), "white")
    _draw_labels(grid, size)
    try:
        with accelerator.autocast():
            for k, example in enumerate(examples):
                square = [center_square(img, size) for img in (example.input, example.target)]
                instruction = synonyms[0] if synonyms else example.instruction
                edited = run_pipeline(pipe, square[0], instruction, steps=inference_steps, seed=seed)
                for column, img in enumerate(square + [edited.resize((size, size))]):
                    grid.paste(img, (column * size, top + k * size))
    finally:
        unet.train()
    path = os.path.join(output, VALIDATION, f"step-{step}.png")
    text = PngImagePlugin.PngInfo()
    text.add_text("columns", " | ".join(COLUMNS))
    with atomic_file(path) as f:
        grid.save(f, format="PNG", pnginfo=text)
    return path


def _draw_labels(grid, size: int) -> None:
    """The column names, centred in the header strip (issue 19: the grid's columns were unlabelled)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=_font_size(size))
    draw = ImageDraw.Draw(grid)
    for column, name in enumerate(COLUMNS):
        width = draw.textlength(name, font=font)
        draw.text((column * size + max(0, (size - width) / 2), 1), name, fill="black", font=font)


def center_square(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))
