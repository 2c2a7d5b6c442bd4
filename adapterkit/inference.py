"""One call of the IP2P pipeline, set up so the same result reproduces in plain diffusers; images in; text features.

`seed` S means `generator=torch.Generator("cpu").manual_seed(S)`; defaults are the instruction-tuning blog's
(20 steps, guidance 7, image guidance 1.5). torch and numpy are imported inside the functions that use them: the
CLI reads the defaults from here and `adapterkit --help` must not load torch.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

from PIL import ExifTags, Image, ImageOps

from .errors import AdapterkitError, first_line

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.0
DEFAULT_IMAGE_GUIDANCE = 1.5
# Refuse images above this many pixels (decompression bombs); 8192 x 8192 is far beyond what IP2P edits.
MAX_IMAGE_PIXELS = 8192 * 8192


def open_image(path: str) -> Image.Image:
    """Open an image file as RGB; one-line errors for missing, unreadable or oversized files."""
    if not os.path.isfile(path):
        raise AdapterkitError(f"image {path} does not exist")
    try:
        return read_rgb(path)
    except Image.DecompressionBombError as e:
        raise AdapterkitError(f"image {path} is too large (over {MAX_IMAGE_PIXELS} pixels); downscale it first") from e
    except (OSError, ValueError, SyntaxError) as e:
        with open(path, "rb") as f:
            if is_heif(f.read(16)) and not heif_support():
                raise AdapterkitError(f"{path} is a HEIC photo (iPhones' default format), which Pillow reads only with the "
                                      f"pillow-heif plugin: {HEIF_FIX}") from e
        raise AdapterkitError(f"cannot read image {path} ({first_line(e)})") from e


# HEIC / HEIF: the ISO box `ftyp` at byte 4 with one of these brands (what phones write).
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
HEIF_FIX = "pip install pillow-heif (or adapterkit[heic]), or export the photo as JPEG"


def is_heif(head: bytes) -> bool:
    """Do these first bytes start a HEIC / HEIF file?"""
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


@functools.cache
def heif_support() -> bool:
    """Teach Pillow HEIC / HEIF through the pillow-heif plugin when it is installed (once); False when it is not.
    Session 23: an iPhone photo got "cannot identify image file"."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def read_rgb(source) -> Image.Image:
    """Open a path or file object as RGB with Pillow's pixel cap set to MAX_IMAGE_PIXELS; PIL's errors propagate.
    An EXIF orientation (a phone's portrait photo is stored sideways with a tag saying so) is applied, as diffusers'
    `load_image` and datasets' Image feature do (session 22: such photos were edited, trained on and served sideways)."""
    heif_support()
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(source) as img:
            img.load()
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                return to_rgb(ImageOps.exif_transpose(img))
            return to_rgb(img)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode: palette and grayscale expand, alpha is composited on white, 16-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_for_edit(img: Image.Image, resolution: int | None) -> Image.Image:
    """Shorter side -> resolution, both sides rounded down to multiples of 8. None keeps the input size."""
    if resolution is None:
        return img
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(8, int(w * scale) // 8 * 8), max(8, int(h * scale) // 8 * 8)
    return img.resize((new_w, new_h), Image.BICUBIC)


MIN_EDIT_SIDE = 8  # below this the pipeline rounds a side down to 0 (VAE multiple 4 or 8) and fails
DEFAULT_SIDE_FACTOR = 4  # no resolution asked: a shorter side over 4x the base's training resolution is scaled to it


def largest_default_side(trained: int) -> int:
    """The longest shorter side `adapterkit edit` and `serve` edit at when no resolution is asked for."""
    return DEFAULT_SIDE_FACTOR * trained


def fit_for_edit(image: Image.Image, resolution: int | None, largest_side: int) -> Image.Image:
    """What `adapterkit edit` and `serve` hand the pipeline: the image itself (a given `resolution` is applied by the
    pipeline call), or, with no resolution asked for and a shorter side over `largest_side` (`largest_default_side`),
    the image scaled down to that side; the result is resized back to the input's size (`at_input_size`). A 4032 x
    3024 phone photo on builtin:tiny (trained at 64 px) is edited at 336 x 256, 25 s from command to file on 2 CPU
    cores; at its own size one of the 20 steps had not finished after 150 s (self-attention over 762k latent
    positions). The Python API (`AdapterBank.edit`) keeps the image's own size, as a diffusers pipeline does."""
    if resolution is not None or min(image.size) <= largest_side:
        return image
    return resize_for_edit(image, largest_side)


def too_small_to_edit(image: Image.Image, resolution: int | None) -> bool:
    """Would the pipeline get a side under MIN_EDIT_SIDE? Only without a resolution: `resize_for_edit` keeps >= 8."""
    return resolution is None and min(image.size) < MIN_EDIT_SIDE


def at_input_size(edited, source, resolution: int | None):
    """Without a resolution the result keeps the input's size: the pipeline rounds both sides down to a multiple of
    its VAE's downscale factor (a 150 x 100 photo comes back 148 x 100 from builtin:tiny's f4 VAE, 144 x 96 from
    SD1.5's f8), so the edit is resized back to the size it came in."""
    if resolution is None and edited.size != source.size:
        return edited.resize(source.size, Image.Resampling.BICUBIC)
    return edited


def run_pipeline(
    pipe,
    image: Image.Image,
    instruction: str,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
    seed: int = 0,
    resolution: int | None = None,
    output_type: str = "pil",
):
    """Edit one image with whatever adapter the pipeline holds now; returns a PIL image (or array for "np")."""
    import torch

    image = resize_for_edit(to_rgb(image), resolution)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        result = pipe(
            instruction,
            image=image,
            num_inference_steps=steps,
            guidance_scale=guidance,
            image_guidance_scale=image_guidance,
            generator=generator,
            output_type=output_type,
        )
    return result.images[0]


class TextFeatures(NamedTuple):
    ids: object  # (n, 77) int64 token ids
    hidden: object  # (n, 77, d_text) float32: last hidden states, what the UNet's cross-attention reads
    pooled: object  # (n, d_text) float32: the pooled (EOS token) output, what routing compares


def encode_text(tokenizer, text_encoder, texts: list[str]) -> TextFeatures:
    """The one text-encoding rule (as the pipeline's encode_prompt): pad/truncate to the tokenizer's max length,
    run the encoder once on the whole list, return float32 features on the encoder's device."""
    import torch

    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_encoder(ids.to(text_encoder.device))
    return TextFeatures(ids, out[0].float(), out.pooler_output.float())


def text_gram(tokenizer, text_encoder, texts: list[str], select=None, batch_size: int = 128, progress=None):
    """(M, n): M = C^T C / n (d_text, d_text) float64 on the CPU over the token rows C the UNet reads for `texts`, n
    the row count. Rows: every position of every text, or what `select(ids, hidden)` returns ((k, d_text), hidden on
    the CPU). One encoder call per `batch_size` texts; `progress` wraps the batch iterable (a tqdm). The merge's
    regularization Gram (merge/features.py) and training's K/V preservation (train/preservation.py) both use it."""
    import torch

    d_text = text_encoder.config.hidden_size
    gram, rows = torch.zeros(d_text, d_text, dtype=torch.float64), 0
    starts = range(0, len(texts), batch_size)
    for start in progress(starts) if progress else starts:
        ids, hidden, _pooled = encode_text(tokenizer, text_encoder, texts[start : start + batch_size])
        hidden = hidden.cpu()
        every = (hidden.reshape(-1, d_text) if select is None else select(ids, hidden)).double()  # (rows, d_text)
        gram += every.T @ every
        rows += every.shape[0]
    return gram / rows, rows
