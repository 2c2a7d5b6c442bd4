"""Procedural edit tasks: (input, instruction, target) triples made from natural-image crops and drawn pictures.

Clean pictures come from two sources, mixed 70/30:
- crops of the public-domain / CC0 / CC-BY photographs bundled with scikit-image and scikit-learn, stored once,
  downscaled, in `source_images.safetensors` beside this file (written by `scripts/build_tiny_base.py --bank-only`;
  the file's metadata names each image's source and licence, see SOURCES.md), so nothing here needs those packages;
- procedural pictures: soft-edged shapes on gradients, and textures of sinusoids over smooth noise.

A task turns a clean picture into (input, target):
- general edits (`GENERAL_TASKS`): the target is the clean picture edited (brighter, sepia, ...). The bundled tiny
  base (`builtin:tiny`) is trained on these.
- held-out tasks (`HELDOUT_TASKS`): the input is the clean picture degraded (rain, noise, low light) or the target
  is it restyled (cartoon). The base never sees them; adapters learn them.

Held-out split: the "train" and "eval" splits draw crops from disjoint photographs (`EVAL_SOURCES` are only used by
"eval") and procedural pictures from disjoint random streams.
Everything is a pure function of (task, seed, split, row index, resolution): row i is the same whatever n is, and
row i of two tasks starts from the same clean picture.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import AdapterkitError

SOURCE_BANK_FILE = "source_images.safetensors"
# Photographs used only by the "eval" split (names are the keys of the source bank).
EVAL_SOURCES = ("coffee", "flower", "gravel", "rocket")
SPLITS = {"train": 1, "eval": 2}
PROCEDURAL_FRACTION = 0.3
DATASET_INFO_FILE = "task.json"

# Array convention in this module: float32 (H, W, 3) RGB in [0, 1] unless a name says uint8.
Edit = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Task:
    """A named edit: its phrasings and how to make (input, target) from a clean picture."""

    name: str
    kind: str  # "general" (the base learns it) or "heldout" (adapters learn it)
    instructions: tuple[str, ...]
    make_pair: Edit  # (clean, rng) -> (input, target), both float32 (H, W, 3) in [0, 1]
    description: str


# ---------------------------------------------------------------- image operations


def luminance(x: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W): Rec. 601 luma."""
    return x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) array, mirror-padded; sigma in pixels."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        x = _convolve_axis(x, taps, axis)
    return x


def _convolve_axis(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    radius = len(taps) // 2
    radius_ok = min(radius, x.shape[axis] - 1)  # np.pad "reflect" needs pad < size
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect" if radius_ok == radius else "edge")
    out = np.zeros_like(x)
    size = x.shape[axis]
    for i, w in enumerate(taps):
        out += w * np.take(padded, np.arange(i, i + size), axis=axis)
    return out


def _scale(x: np.ndarray) -> float:
    """Pixel lengths below are for 64 px pictures; this rescales them to the picture's size."""
    return min(x.shape[:2]) / 64.0


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- general edits (the base learns these)


def brighter(x, rng):
    return x, _clip(x**0.5)  # gamma 0.5: shadows lift most, whites stay white


def darker(x, rng):
    return x, _clip(x**2.0)


def more_contrast(x, rng):
    mean = luminance(x).mean()
    return x, _clip((x - mean) * 1.8 + mean)


def grayscale(x, rng):
    return x, _clip(np.repeat(luminance(x)[..., None], 3, axis=-1))


# YIQ: a hue shift is a rotation of the (I, Q) chroma plane by a fixed angle, luma untouched.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def hue_shift(x, rng, degrees: float = 120.0):
    a = np.deg2rad(degrees)
    rotate = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], dtype=np.float32)
    matrix = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ  # (3, 3) applied to each pixel's RGB column
    return x, _clip(x @ matrix.T)


def blur(x, rng):
    return x, _clip(gaussian_blur(x, 1.5 * _scale(x)))


def sharpen(x, rng):
    return x, _clip(x + 1.5 * (x - gaussian_blur(x, 1.0 * _scale(x))))  # unsharp mask


def invert(x, rng):
    return x, _clip(1.0 - x)


def posterize(x, rng, levels: int = 4):
    return x, _clip(np.round(x * (levels - 1)) / (levels - 1))


_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def sepia(x, rng):
    return x, _clip(x @ _SEPIA.T)


# ---------------------------------------------------------------- held-out tasks (adapters learn these)


def rain_streaks(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) streak layer in [0, 1]: sparse drops smeared along one slanted direction, then softened."""
    h, w = shape
    scale = min(h, w) / 64.0
    drops = (rng.random((h, w)) < rng.uniform(0.004, 0.010)).astype(np.float32) * rng.uniform(0.6, 1.0, (h, w))
    angle = np.deg2rad(rng.uniform(-25, 25))  # from vertical
    length = max(3, int(rng.uniform(6, 12) * scale))
    streaks = np.zeros_like(drops)
    for t in range(length):  # smear: sum of copies shifted along (dy, dx) = t * (cos, sin)
        dy, dx = int(round(t * np.cos(angle))), int(round(t * np.sin(angle)))
        streaks += np.roll(drops, (dy, dx), axis=(0, 1))
    streaks = gaussian_blur(streaks, 0.5 * scale)
    return np.clip(streaks * 1.5, 0.0, 1.0)


def derain(x, rng):
    streaks = rain_streaks(x.shape[:2], rng)[..., None] * rng.uniform(0.6, 0.9)
    rainy = 1.0 - (1.0 - x * rng.uniform(0.85, 1.0)) * (1.0 - streaks)  # screen blend, slightly dimmed scene
    return _clip(rainy), x


def bilateral(x: np.ndarray, radius: int, sigma_space: float, sigma_color: float) -> np.ndarray:
    """Edge-preserving smoothing: each pixel averages neighbours weighted by distance and colour difference."""
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    total = np.zeros_like(x)
    weight_sum = np.zeros(x.shape[:2] + (1,), dtype=np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            shifted = padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
            colour_dist = ((shifted - x) ** 2).sum(-1, keepdims=True)
            wgt = np.exp(-(dy * dy + dx * dx) / (2 * sigma_space**2) - colour_dist / (2 * sigma_color**2))
            total += wgt * shifted
            weight_sum += wgt
    return total / weight_sum


def sobel_magnitude(y: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W) gradient magnitude with 3x3 Sobel kernels."""
    p = np.pad(y, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.sqrt(gx * gx + gy * gy)


def cartoonize(x, rng, levels: int = 5):
    scale = _scale(x)
    smooth = x
    for _ in range(2):
        smooth = bilateral(smooth, radius=max(1, int(round(2 * scale))), sigma_space=1.5 * scale, sigma_color=0.12)
    flat = np.round(smooth * (levels - 1)) / (levels - 1)  # colour quantisation
    edges = sobel_magnitude(gaussian_blur(luminance(smooth), 0.7 * scale))
    ink = np.clip((edges - 0.25) / 0.15, 0.0, 1.0)[..., None]  # soft threshold -> dark outlines
    return x, _clip(flat * (1.0 - 0.85 * ink))


def denoise(x, rng):
    noisy = x + rng.normal(0.0, rng.uniform(0.06, 0.12), x.shape).astype(np.float32)
    return _clip(noisy), x


def lowlight(x, rng):
    dark = rng.uniform(0.45, 0.75) * x ** rng.uniform(1.8, 2.6)  # gamma-darkened, dimmed exposure
    noisy = dark + rng.normal(0.0, rng.uniform(0.01, 0.03), x.shape).astype(np.float32)  # sensor noise
    return _clip(noisy), x


def _task(name, kind, make_pair, description, *instructions) -> Task:
    return Task(name=name, kind=kind, instructions=tuple(instructions), make_pair=make_pair, description=description)


_ALL = (
    _task("brighter", "general", brighter, "gamma 0.5",
          "make it brighter", "brighten the image", "make the photo brighter", "increase the brightness", "brighten it"),
    _task("darker", "general", darker, "gamma 2.0",
          "make it darker", "darken the image", "make the photo darker", "reduce the brightness", "darken it"),
    _task("contrast", "general", more_contrast, "contrast x1.8 around the mean luma",
          "add more contrast", "increase the contrast", "make the contrast stronger", "more contrast please",
          "boost the contrast"),
    _task("grayscale", "general", grayscale, "Rec. 601 luma",
          "make it grayscale", "convert to black and white", "turn the photo gray", "remove the colors",
          "make it black and white"),
    _task("hue", "general", hue_shift, "YIQ chroma rotated by 120 degrees",
          "shift the hue", "rotate the hue", "change the hue of the colors", "shift the colors", "hue shift the image"),
    _task("blur", "general", blur, "Gaussian, sigma 1.5 px at 64 px",
          "blur the image", "make it blurry", "add blur", "blur the photo", "soften the image"),
    _task("sharpen", "general", sharpen, "unsharp mask, amount 1.5, sigma 1 px at 64 px",
          "sharpen the image", "make it sharper", "sharpen the photo", "add sharpness", "make the edges sharp"),
    _task("invert", "general", invert, "1 - x",
          "invert the colors", "invert the image", "make a negative", "turn it into a negative", "invert the photo"),
    _task("posterize", "general", posterize, "4 levels per channel",
          "posterize the image", "posterize it", "reduce the number of colors", "make it look like a poster",
          "posterize the photo"),
    _task("sepia", "general", sepia, "classic sepia matrix",
          "apply a sepia filter", "make it sepia", "sepia tone the photo", "give it a sepia look",
          "make it look old and brown"),
    _task("derain", "heldout", derain, "input: slanted rain streaks screen-blended in; target: the clean picture",
          "derain the image", "remove the rain", "remove the rain streaks", "clear the rain from the photo",
          "derain this photo"),
    _task("cartoonize", "heldout", cartoonize,
          "target: 2x bilateral smoothing, 5-level colour quantisation, dark Sobel outlines",
          "cartoonize the image", "make it a cartoon", "turn the photo into a cartoon", "cartoonize it",
          "give it a cartoon style"),
    _task("denoise", "heldout", denoise, "input: Gaussian noise, sigma 0.06-0.12; target: the clean picture",
          "denoise the image", "remove the noise", "clean up the noise", "make it less noisy", "denoise the photo"),
    _task("lowlight", "heldout", lowlight,
          "input: gamma 1.8-2.6, exposure x0.45-0.75, noise sigma 0.01-0.03; target: the clean picture",
          "enhance the low light image", "fix the low light photo", "correct the underexposed photo",
          "restore the lowlight image", "lowlight enhance the picture"),
)
TASKS: dict[str, Task] = {t.name: t for t in _ALL}
GENERAL_TASKS = tuple(t.name for t in _ALL if t.kind == "general")
HELDOUT_TASKS = tuple(t.name for t in _ALL if t.kind == "heldout")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AdapterkitError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- clean pictures


def source_bank_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SOURCE_BANK_FILE)


@lru_cache(maxsize=1)
def _load_bank() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = source_bank_path()
    if not os.path.isfile(path):
        raise AdapterkitError(
            f"the demo source images are missing ({path}); reinstall adapterkit or run "
            "scripts/build_tiny_base.py --bank-only"
        )
    return dict(sorted(load_file(path).items()))  # name -> uint8 (H, W, 3)


def source_images(split: str) -> list[tuple[str, np.ndarray]]:
    """The photographs a split crops from: (name, uint8 (H, W, 3)), sorted by name."""
    _check_split(split)
    bank = _load_bank()
    return [(name, img) for name, img in bank.items() if (name in EVAL_SOURCES) == (split == "eval")]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise AdapterkitError(f"unknown split '{split}'; use 'train' or 'eval'")


def random_crop(img: np.ndarray, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (side between `resolution` and the shorter side), resized to resolution, maybe mirrored."""
    h, w = img.shape[:2]
    short = min(h, w)
    side = int(rng.integers(min(resolution, short), short + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(img[top : top + side, left : left + side])
    crop = crop.resize((resolution, resolution), Image.Resampling.LANCZOS)
    out = np.asarray(crop, dtype=np.float32) / 255.0
    return out[:, ::-1] if rng.random() < 0.5 else out


def procedural_picture(resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Shapes on a gradient, or a texture, at (resolution, resolution, 3)."""
    yy, xx = (np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5) / resolution
    return _shapes(xx, yy, rng) if rng.random() < 0.5 else _texture(xx, yy, rng)


def _shapes(xx, yy, rng) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a), 0, 1)[..., None]
    img = rng.random(3) * (1 - t) + rng.random(3) * t  # (H, W, 3) linear gradient between two colours
    pixel = 1.0 / xx.shape[0]
    for _ in range(int(rng.integers(3, 9))):
        cx, cy, rot = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)  # shape-local coordinates
        v = -(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)
        a_half, b_half = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
        if rng.random() < 0.5:  # ellipse, approximate signed distance in pixels
            dist = (np.sqrt((u / a_half) ** 2 + (v / b_half) ** 2) - 1) * min(a_half, b_half)
        else:  # rectangle
            dist = np.maximum(np.abs(u) - a_half, np.abs(v) - b_half)
        mask = np.clip(0.5 - dist / pixel, 0, 1)[..., None]  # one-pixel soft edge (anti-aliasing)
        img = img * (1 - mask) + rng.random(3) * mask
    return img.astype(np.float32)


def _texture(xx, yy, rng) -> np.ndarray:
    field = np.zeros_like(xx)
    for _ in range(3):
        freq, ang, phase = rng.uniform(2, 12), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + phase)
    coarse = rng.random((int(rng.integers(3, 9)),) * 2).astype(np.float32)  # smooth noise: tiny grid, bicubic up
    noise = np.asarray(Image.fromarray(coarse, mode="F").resize(xx.shape[::-1], Image.Resampling.BICUBIC))
    t = np.clip(0.5 + field / 6 + (noise - 0.5), 0, 1)[..., None]  # (H, W, 1) in [0, 1]
    c0, c1, c2 = rng.random(3), rng.random(3), rng.random(3)
    img = np.where(t < 0.5, c0 + (c1 - c0) * (2 * t), c1 + (c2 - c1) * (2 * t - 1))  # three-colour ramp
    return img.astype(np.float32)


def clean_picture(index: int, seed: int, resolution: int, split: str) -> np.ndarray:
    """Row `index`'s clean picture, quantised to 8 bits (as if read from a PNG)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    if rng.random() < PROCEDURAL_FRACTION:
        img = procedural_picture(resolution, rng)
    else:
        sources = source_images(split)
        img = random_crop(sources[int(rng.integers(len(sources)))][1], resolution, rng)
    return np.round(np.clip(img, 0, 1) * 255) / 255.0


# ---------------------------------------------------------------- examples and datasets


@dataclass
class Example:
    input: np.ndarray  # uint8 (H, W, 3)
    instruction: str
    target: np.ndarray  # uint8 (H, W, 3)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def make_example(task: str, index: int, seed: int = 0, resolution: int = 64, split: str = "train") -> Example:
    """Row `index` of a task: deterministic in (task, index, seed, resolution, split)."""
    spec = get_task(task)
    _check_split(split)
    clean = clean_picture(index, seed, resolution, split).astype(np.float32)
    rng = np.random.default_rng([seed, SPLITS[split], index, zlib.crc32(spec.name.encode())])
    source, target = spec.make_pair(clean, rng)
    instruction = spec.instructions[int(rng.integers(len(spec.instructions)))]
    return Example(input=_to_uint8(source), instruction=instruction, target=_to_uint8(target))


def make_examples(task: str, n: int, seed: int = 0, resolution: int = 64, split: str = "train", start: int = 0):
    return [make_example(task, i, seed, resolution, split) for i in range(start, start + n)]


def _check_dataset_args(task: str, n: int, resolution: int, split: str) -> None:
    get_task(task)
    _check_split(split)
    if n < 1:
        raise AdapterkitError(f"the number of rows must be at least 1 (got {n})")
    if resolution < 16 or resolution % 8:
        raise AdapterkitError(f"the resolution must be a multiple of 8, at least 16 (got {resolution})")


def write_task_dataset(
    task: str | Sequence[str], output: str, n: int = 200, seed: int = 0, resolution: int = 64, split: str = "train",
    quiet: bool = False,
) -> str:
    """Write `n` rows of `task` (or `n` rows of each of several tasks) as an imagefolder dataset, atomically.

    Layout: `input/00000.png`, `edited/00000.png` (several tasks: `input/derain-00000.png`, ...), `metadata.jsonl`
    rows `{"input_image_file_name", "edited_image_file_name", "edit_prompt"}` (datasets' imagefolder turns them into
    the columns `input_image`, `edited_image`, `edit_prompt`: diffusers' IP2P script defaults), and `task.json`
    (task(s), instructions, seed, split). Returns `output`.
    """
    from tqdm.auto import tqdm

    from ..fileio import atomic_folder

    names = [task] if isinstance(task, str) else list(task)
    if not names:
        raise AdapterkitError("name at least one task to write")
    for name in names:
        _check_dataset_args(name, n, resolution, split)
    jobs = [(name, i) for name in names for i in range(n)]
    with atomic_folder(output) as tmp:
        os.makedirs(os.path.join(tmp, "input"))
        os.makedirs(os.path.join(tmp, "edited"))
        rows = []
        for name, i in tqdm(jobs, desc=f"writing {', '.join(names)}", disable=quiet):
            ex = make_example(name, i, seed, resolution, split)
            file = f"{i:05d}.png" if len(names) == 1 else f"{name}-{i:05d}.png"
            Image.fromarray(ex.input).save(os.path.join(tmp, "input", file))
            Image.fromarray(ex.target).save(os.path.join(tmp, "edited", file))
            rows.append({"input_image_file_name": f"input/{file}", "edited_image_file_name": f"edited/{file}",
                         "edit_prompt": ex.instruction})
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        with open(os.path.join(tmp, DATASET_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(_dataset_info(names, n, seed, split, resolution), f, indent=2)
    return output


def _dataset_info(names: list[str], n: int, seed: int, split: str, resolution: int) -> dict:
    """task.json: one task's description, or a list of them for a multi-task folder."""
    specs = [{"task": t, "kind": TASKS[t].kind, "description": TASKS[t].description,
              "instructions": list(TASKS[t].instructions)} for t in names]
    common = {"rows": n, "seed": seed, "split": split, "resolution": resolution}
    return {**specs[0], **common} if len(specs) == 1 else {"tasks": specs, "rows_per_task": n, **common}


# ---------------------------------------------------------------- scoring a base on tasks


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two images as uint8 or float in [0, 1]; capped at 100 for identical images."""
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    b = b.astype(np.float64) / 255.0 if b.dtype == np.uint8 else b.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return 100.0 if mse <= 1e-10 else float(10 * np.log10(1.0 / mse))


def score_task(
    pipe, task: str, n: int = 8, seed: int = 0, resolution: int = 64, split: str = "eval", steps: int = 20,
    guidance: float = 7.0, image_guidance: float = 1.5, batch_size: int = 8,
) -> dict:
    """Mean PSNR to the target of the unedited input and of the pipeline's output, over `n` rows of `split`.

    Rows are edited in batches with `generator=torch.Generator("cpu").manual_seed(seed + first row)`.
    Returns {"task", "psnr_input", "psnr_output", "gain", "n"}.
    """
    import torch

    examples = make_examples(task, n, seed, resolution, split)
    psnr_in, psnr_out = [], []
    for start in range(0, n, batch_size):
        batch = examples[start : start + batch_size]
        with torch.no_grad():
            out = pipe(
                prompt=[ex.instruction for ex in batch],
                image=[Image.fromarray(ex.input) for ex in batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                image_guidance_scale=image_guidance,
                generator=torch.Generator("cpu").manual_seed(seed + start),
                output_type="np",
            ).images  # (B, H, W, 3) float in [0, 1]
        for ex, edited in zip(batch, out):
            psnr_in.append(psnr(ex.input, ex.target))
            psnr_out.append(psnr(_to_uint8(edited), ex.target))
    result = {"task": task, "psnr_input": float(np.mean(psnr_in)), "psnr_output": float(np.mean(psnr_out)), "n": n}
    result["gain"] = result["psnr_output"] - result["psnr_input"]
    return result


def format_scores(scores: list[dict]) -> str:
    """A plain-text table of `score_task` results."""
    lines = [f"{'task':<12} {'PSNR input':>10} {'PSNR base':>10} {'gain dB':>8}"]
    for s in scores:
        lines.append(f"{s['task']:<12} {s['psnr_input']:>10.2f} {s['psnr_output']:>10.2f} {s['gain']:>+8.2f}")
    return "\n".join(lines)
