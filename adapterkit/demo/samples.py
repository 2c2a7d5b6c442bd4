"""Sample images for `adapterkit serve`'s web page: the bundled eval-split photographs, centre-cropped square."""

from __future__ import annotations

import io

from PIL import Image

from .pictures import source_images


def sample_pngs() -> dict[str, bytes]:
    """name -> PNG bytes of a square centre crop (192 x 192, a multiple of 8) of each eval-split photograph."""
    samples = {}
    for name, pixels in source_images("eval"):
        h, w = pixels.shape[:2]
        side = min(h, w) // 8 * 8
        top, left = (h - side) // 2, (w - side) // 2
        buffer = io.BytesIO()
        Image.fromarray(pixels[top:top + side, left:left + side]).save(buffer, format="PNG")
        samples[name] = buffer.getvalue()
    return samples
