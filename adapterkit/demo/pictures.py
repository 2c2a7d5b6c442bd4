"""Clean pictures for the procedural tasks: crops of bundled photographs (70%) and procedural pictures (30%).

Photographs: the public-domain / CC0 / CC-BY images bundled with scikit-image and scikit-learn, stored once,
downscaled, in `source_images.safetensors` beside this file (written by `scripts/build_tiny_base.py --bank-only`;
the file's metadata names each image's source and licence, see SOURCES.md), so nothing here needs those packages.
The "train" and "eval" splits crop disjoint photographs (`EVAL_SOURCES` only for "eval") and draw procedural
pictures from disjoint random streams. Float32 (H, W, 3) RGB in [0, 1].
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from PIL import Image

from ..errors import AdapterkitError

SOURCE_BANK_FILE = "source_images.safetensors"
# Photographs used only by the "eval" split (names are the keys of the source bank).
EVAL_SOURCES = ("coffee", "flower", "gravel", "rocket")
SPLITS = {"train": 1, "eval": 2}
PROCEDURAL_FRACTION = 0.3



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
    check_split(split)
    bank = _load_bank()
    return [(name, img) for name, img in bank.items() if (name in EVAL_SOURCES) == (split == "eval")]


def check_split(split: str) -> None:
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


