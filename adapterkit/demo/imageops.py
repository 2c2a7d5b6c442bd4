"""Image operations the procedural tasks are made of: float32 (H, W, 3) RGB in [0, 1] unless a name says otherwise.

Pixel lengths are given for 64 px pictures and rescaled to the picture's size by `pixel_scale`.
"""

from __future__ import annotations

import numpy as np



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


def pixel_scale(x: np.ndarray) -> float:
    """Pixel lengths below are for 64 px pictures; this rescales them to the picture's size."""
    return min(x.shape[:2]) / 64.0


def clip01(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32)



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




def median3(x: np.ndarray) -> np.ndarray:
    """3x3 median of each channel, edge-padded: removes details one or two pixels wide, keeps larger edges."""
    h, w = x.shape[:2]
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    shifted = np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])  # (9, H, W, 3)
    return np.median(shifted, axis=0).astype(np.float32)


def box_pixelate(x: np.ndarray, block: int) -> np.ndarray:
    """Each block x block tile replaced by its mean colour (edges of a non-multiple size use partial tiles)."""
    h, w = x.shape[:2]
    out = np.empty_like(x)
    for top in range(0, h, block):
        for left in range(0, w, block):
            tile = x[top : top + block, left : left + block]
            out[top : top + block, left : left + block] = tile.mean(axis=(0, 1))
    return out


def ink_lines(y: np.ndarray, scale: float, low: float, width: float) -> np.ndarray:
    """(H, W) luma -> (H, W) ink in [0, 1]: a soft threshold of the Sobel magnitude of the slightly blurred luma."""
    edges = sobel_magnitude(gaussian_blur(y, 0.7 * scale))
    return np.clip((edges - low) / width, 0.0, 1.0)


def dark_line_mask(x: np.ndarray, depth: float = 0.12) -> np.ndarray:
    """(H, W, 3) -> (H, W) bool: pixels much darker than their neighbourhood (ink lines, outlines).

    A pixel is on a dark line when its luma lies `depth` below the local median of a 5x5 window: thin dark strokes
    qualify, dark regions wider than the window do not.
    """
    y = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    h, w = y.shape
    padded = np.pad(y, 2, mode="edge")
    window = np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(5) for dx in range(5)])
    return (np.median(window, axis=0) - y) > depth


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation with a (2r+1) square."""
    h, w = mask.shape
    padded = np.pad(mask, radius, mode="constant")
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out
