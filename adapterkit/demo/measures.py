"""Task-specific measures: whether the task itself was done, beyond PSNR (which also rewards undoing damage).

- derain: PSNR on the rain pixels only (the streak mask its generator drew, `tasks.rain_mask`): a model that keeps
  the streaks scores low there however well it keeps the rest of the picture.
- cartoonize: F1 of the output's dark outlines against the target's, both found by `imageops.dark_line_mask`,
  matched within one pixel (as edge benchmarks such as BSDS500 match boundaries within a small tolerance).
"""

from __future__ import annotations

import math

import numpy as np

from .imageops import dark_line_mask, dilate


def _unit(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def masked_psnr(output: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, data range 1) over the pixels where `mask` (H, W) is true; images (H, W, 3) uint8 or [0, 1]."""
    if not mask.any():
        raise ValueError("the mask selects no pixel")
    diff = (_unit(output) - _unit(target))[mask]  # (k, 3)
    mse = float(np.mean(diff**2))
    return 100.0 if mse == 0.0 else min(100.0, 10.0 * math.log10(1.0 / mse))


def outline_f1(output: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 of dark-line pixels of `output` against those of `target`, each matched within `tolerance` pixels."""
    found = dark_line_mask(_unit(output).astype(np.float32))
    truth = dark_line_mask(_unit(target).astype(np.float32))
    if not truth.any():
        return 1.0 if not found.any() else 0.0
    precision = (found & dilate(truth, tolerance)).sum() / max(1, found.sum())
    recall = (truth & dilate(found, tolerance)).sum() / truth.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))
