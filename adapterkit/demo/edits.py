"""The procedural edits: each maps (clean picture, rng) -> (input, target), float32 (H, W, 3) in [0, 1].

General edits (the bundled base learns them) are the primitives a real InstructPix2Pix picks up from its training
set: tone and colour changes, blur and sharpening, local and edge-aware smoothing, colour quantisation, drawing
edges, pixelation. Held-out tasks (derain, cartoonize, denoise, lowlight: adapters learn them) are never shown to
the base. A general edit draws no randomness; held-out tasks do (rain, noise, exposure).
"""

from __future__ import annotations

import numpy as np

from .imageops import (
    bilateral, box_pixelate, clip01, gaussian_blur, ink_lines, luminance, median3, pixel_scale,
)

# ---------------------------------------------------------------- general edits: tone and colour


def brighter(x, rng):
    return x, clip01(x**0.5)  # gamma 0.5: shadows lift most, whites stay white


def darker(x, rng):
    return x, clip01(x**2.0)


def more_contrast(x, rng):
    mean = luminance(x).mean()
    return x, clip01((x - mean) * 1.8 + mean)


def grayscale(x, rng):
    return x, clip01(np.repeat(luminance(x)[..., None], 3, axis=-1))


# YIQ: a hue shift is a rotation of the (I, Q) chroma plane by a fixed angle, luma untouched.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def hue_shift(x, rng, degrees: float = 120.0):
    a = np.deg2rad(degrees)
    rotate = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], dtype=np.float32)
    matrix = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ  # (3, 3) applied to each pixel's RGB column
    return x, clip01(x @ matrix.T)


def invert(x, rng):
    return x, clip01(1.0 - x)


def posterize(x, rng, levels: int = 4):
    return x, clip01(np.round(x * (levels - 1)) / (levels - 1))


_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def sepia(x, rng):
    return x, clip01(x @ _SEPIA.T)


def saturate(x, rng):
    y = luminance(x)[..., None]
    return x, clip01(y + 1.8 * (x - y))  # chroma x1.8 around each pixel's luma


def warmer(x, rng):
    return x, clip01(x * np.array([1.15, 1.0, 0.8], dtype=np.float32))  # white balance toward orange


# ---------------------------------------------------------------- general edits: spatial


def blur(x, rng):
    return x, clip01(gaussian_blur(x, 1.5 * pixel_scale(x)))


def sharpen(x, rng):
    return x, clip01(x + 1.5 * (x - gaussian_blur(x, 1.0 * pixel_scale(x))))  # unsharp mask


def smooth_keep_edges(x, rng):
    s = pixel_scale(x)  # one bilateral pass: flat regions smoothed, edges between regions kept
    return x, clip01(bilateral(x, radius=max(1, int(round(2 * s))), sigma_space=1.5 * s, sigma_color=0.1))


def median_filter(x, rng):
    return x, clip01(median3(x))  # local smoothing: details of 1-2 px removed


def outline(x, rng):
    ink = ink_lines(luminance(x), pixel_scale(x), low=0.3, width=0.2)[..., None]
    return x, clip01(x * (1.0 - 0.85 * ink))  # dark lines drawn over the strong edges


def pixelate(x, rng):
    return x, clip01(box_pixelate(x, max(2, int(round(4 * pixel_scale(x))))))


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
    return clip01(rainy), x


def cartoonize(x, rng, levels: int = 5):
    scale = pixel_scale(x)
    smooth = x
    for _ in range(2):
        smooth = bilateral(smooth, radius=max(1, int(round(2 * scale))), sigma_space=1.5 * scale, sigma_color=0.12)
    flat = np.round(smooth * (levels - 1)) / (levels - 1)  # colour quantisation
    ink = ink_lines(luminance(smooth), scale, low=0.25, width=0.15)[..., None]  # soft threshold -> dark outlines
    return x, clip01(flat * (1.0 - 0.85 * ink))


def denoise(x, rng):
    noisy = x + rng.normal(0.0, rng.uniform(0.06, 0.12), x.shape).astype(np.float32)
    return clip01(noisy), x


def lowlight(x, rng):
    dark = rng.uniform(0.45, 0.75) * x ** rng.uniform(1.8, 2.6)  # gamma-darkened, dimmed exposure
    noisy = dark + rng.normal(0.0, rng.uniform(0.01, 0.03), x.shape).astype(np.float32)  # sensor noise
    return clip01(noisy), x
