"""Image metrics for judging edits: PSNR, SSIM and L1 against the target, CLIP similarities, optional LPIPS.

All pixel metrics work on 8-bit RGB images scaled to [0, 1] (float64), which is what the saved PNGs hold, so
every figure in a report can be recomputed from the files:

- PSNR = 10 log10(1 / MSE), MSE over all pixels and channels (data range 1). Identical images would give
  infinity; we report MAX_PSNR (100 dB) instead so that means and JSON stay finite.
- SSIM as in Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances,
  computed per channel over the window positions that fit inside the image, then averaged. This is
  scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)`.
- L1 = mean absolute difference in [0, 1].
- CLIP image similarity (InstructPix2Pix paper, arXiv 2211.09800, Fig. 8): cos(E_I(input), E_I(output)), how
  much of the input survives the edit.
- CLIP directional similarity (same figure; Gal et al., StyleGAN-NADA): cos(E_I(output) - E_I(input),
  E_T(output caption) - E_T(input caption)), whether the image changed the way the text says. Our datasets
  carry an instruction, not two captions, so the captions are formed as
  input caption = "a photo", output caption = "a photo. <instruction>" (CAPTION_BEFORE / CAPTION_AFTER):
  the text direction is then what the instruction adds to a neutral caption.
- LPIPS (Zhang et al. 2018) only when the `lpips` package imports and its network weights load; otherwise the
  reason is returned and the report says the metric was skipped.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from ..errors import AdapterkitError, first_line

MAX_PSNR = 100.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # 5: an 11-tap window, as Wang et al. and scikit-image use
SSIM_K1, SSIM_K2 = 0.01, 0.03
CAPTION_BEFORE = "a photo"
CAPTION_AFTER = "a photo. {instruction}"

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; larger df use a Cornish-Fisher expansion.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)


def to_unit_array(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected 8-bit RGB pixels, got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise TypeError(f"expected an (H, W, 3) RGB image, got shape {array.shape}")
    return array.astype(np.float64) / 255.0


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = to_unit_array(a), to_unit_array(b)
    if x.shape != y.shape:
        raise AdapterkitError(f"cannot compare images of sizes {x.shape[1]}x{x.shape[0]} and {y.shape[1]}x{y.shape[0]}")
    return x, y


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB (data range 1), capped at MAX_PSNR for identical images."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return MAX_PSNR
    return min(MAX_PSNR, 10.0 * math.log10(1.0 / mse))


def l1(a, b) -> float:
    x, y = _pair(a, b)
    return float(np.mean(np.abs(x - y)))


def _gaussian_taps() -> np.ndarray:
    offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()  # (11,)


def _window_mean(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean over every window that fits: (H, W, C) -> (H-10, W-10, C).

    Separable: a sliding (11,) window along rows, then along columns, each a matrix product with the taps.
    """
    windows = np.lib.stride_tricks.sliding_window_view(x, len(taps), axis=0)  # (H-10, W, C, 11)
    x = windows @ taps
    windows = np.lib.stride_tricks.sliding_window_view(x, len(taps), axis=1)  # (H-10, W-10, C, 11)
    return windows @ taps


def ssim(a, b) -> float:
    """Mean structural similarity (Wang et al. 2004) over channels and window positions."""
    x, y = _pair(a, b)
    size = 2 * SSIM_RADIUS + 1
    if min(x.shape[:2]) < size:
        raise AdapterkitError(f"SSIM needs images of at least {size}x{size} pixels; got {x.shape[1]}x{x.shape[0]}")
    taps = _gaussian_taps()
    mu_x, mu_y = _window_mean(x, taps), _window_mean(y, taps)
    var_x = _window_mean(x * x, taps) - mu_x**2
    var_y = _window_mean(y * y, taps) - mu_y**2
    cov = _window_mean(x * y, taps) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K * data range)^2 with data range 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean(axis=(0, 1)).mean())  # mean per channel, then over channels


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (table, then a 4-term expansion)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def summarise(values: list[float]) -> dict:
    """{"mean", "ci95": [low, high] or None, "n"}: a Student-t interval for the mean (None when n < 2)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = t_quantile_975(n - 1) * float(data.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


# ------------------------------------------------------------------------------------------------------ CLIP
class ClipScorer:
    """A CLIP model (local folder or hub id) that embeds images and texts into its joint space."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        self.name_or_path = name_or_path
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(self.device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
            # AutoImageProcessor picks the PIL backend when torchvision is absent (CLIPImageProcessor would warn)
            self.image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            where = "folder" if os.path.isdir(name_or_path) else "hub id (is it cached for offline use?)"
            raise AdapterkitError(
                f"cannot load the CLIP model '{name_or_path}' as a {where}: {first_line(e)}; pass a CLIP checkpoint "
                "with its tokenizer and preprocessor_config.json"
            ) from e
        # transformers 5: a hub tokenizer loaded offline can come back empty (vocabulary size 2) instead of failing
        if len(self.tokenizer) <= 2:
            raise AdapterkitError(
                f"the tokenizer of CLIP model '{name_or_path}' came back empty; pass a folder with vocab.json and merges.txt"
            )

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, d) unit vectors: the projected pooled vision output of each image."""
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(n, d) unit vectors: the projected pooled (end-of-text token) text output of each text."""
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pooled = self.model.text_model(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        ).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()

    def caption_direction(self, instruction: str) -> torch.Tensor:
        """(d,) E_T(output caption) - E_T(input caption) for an instruction (captions: module docstring)."""
        before, after = self.text_features([CAPTION_BEFORE, CAPTION_AFTER.format(instruction=instruction)])
        return after - before


def clip_image_similarity(input_features: torch.Tensor, output_features: torch.Tensor) -> float:
    """cos(E_I(input), E_I(output)) for one pair of (d,) unit vectors."""
    return float(torch.dot(input_features, output_features))


def clip_directional_similarity(input_features: torch.Tensor, output_features: torch.Tensor, text_direction: torch.Tensor) -> float:
    """cos(E_I(output) - E_I(input), text direction); 0 when either direction is zero (no change at all)."""
    image_direction = output_features - input_features
    denominator = float(image_direction.norm() * text_direction.norm())
    if denominator == 0.0:
        return 0.0
    return float(torch.dot(image_direction, text_direction)) / denominator


# ----------------------------------------------------------------------------------------------------- LPIPS
class LpipsScorer:
    """LPIPS distance (AlexNet features) via the `lpips` package, on images scaled to [-1, 1]."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def __call__(self, a, b) -> float:
        x, y = _pair(a, b)
        # (H, W, 3) in [0, 1] -> (1, 3, H, W) in [-1, 1], the range lpips expects
        tx = torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0).float() * 2 - 1
        ty = torch.from_numpy(y).permute(2, 0, 1).unsqueeze(0).float() * 2 - 1
        return float(self.model(tx, ty).mean())


def load_lpips() -> tuple[LpipsScorer | None, str | None]:
    """(scorer, None) when LPIPS and its weights load, else (None, "skipped: <reason>")."""
    try:
        import lpips
    except ImportError:
        return None, "skipped: the lpips package is not installed (pip install lpips, with network for its weights)"
    try:
        model = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as e:  # noqa: BLE001 - any failure to fetch or read weights means: skip the metric
        return None, f"skipped: LPIPS weights did not load ({type(e).__name__}: {first_line(e)})"
    return LpipsScorer(model), None

