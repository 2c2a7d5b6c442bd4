"""Reading an edit request: multipart form or JSON (image as base64), fields typed and bounded, the image decoded
under a pixel cap; every problem is a `ServeError` with its HTTP status and a one-line message naming the fix."""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..errors import first_line
from ..inference import HEIF_FIX, MIN_EDIT_SIDE, heif_support, is_heif, read_rgb, resize_for_edit, too_small_to_edit

BASE = "base"  # the adapter name that asks for the base alone


class ServeError(Exception):
    """An expected failure of one request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def unknown_adapter(name: str, known: list[str]) -> ServeError:
    return ServeError(404, f"unknown adapter '{name}'; known: auto, {BASE}" + "".join(f", {t}" for t in known))


@dataclass(frozen=True)
class EditParams:
    instruction: str
    adapter: str = "auto"  # "auto" (route by instruction), "base", or a task name
    seed: int = 0
    steps: int | None = None  # None: the base's recorded default, else the blog's (as `adapterkit edit`, issue 18)
    guidance: float | None = None
    image_guidance: float | None = None
    resolution: int | None = None  # shorter side after resizing (multiples of 8); None: the image's own size
    timeout: float | None = None  # seconds this request may take (at most the server's timeout)

    def options(self, base) -> dict:
        """Steps and guidance scales: each given, else what `base` records, else the blog's (Base.sampler)."""
        return base.sampler(self.steps, self.guidance, self.image_guidance).options()


FIELD_TYPES = {"instruction": str, "adapter": str, "seed": int, "steps": int, "guidance": float,
               "image_guidance": float, "resolution": int, "timeout": float}


def _typed(name: str, value, kind):
    if kind is str:
        if not isinstance(value, str):
            raise ServeError(400, f"field '{name}' must be a string")
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ServeError(400, f"field '{name}' must be a number")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        return float(value)
    except ValueError:
        raise ServeError(400, f"field '{name}' must be {'an integer' if kind is int else 'a number'}, got '{value}'") from None


def parse_params(raw: dict, settings) -> EditParams:
    """Typed, bounded EditParams from the request's fields (strings from a form, JSON values from JSON)."""
    unknown = sorted(set(raw) - set(FIELD_TYPES))
    if unknown:
        raise ServeError(400, f"unknown field(s) {', '.join(unknown)}; fields: image, {', '.join(FIELD_TYPES)}")
    values = {k: _typed(k, v, FIELD_TYPES[k]) for k, v in raw.items() if v is not None and v != ""}
    if not values.get("instruction"):
        raise ServeError(400, "field 'instruction' is required, e.g. instruction=derain the image")
    if len(values["instruction"]) > settings.max_instruction_chars:
        raise ServeError(400, f"instruction is over {settings.max_instruction_chars} characters; shorten it")
    bounds = {"steps": (1, settings.max_steps), "resolution": (8, settings.max_resolution), "timeout": (0.001, settings.timeout_s),
              "seed": (0, 2**63 - 1), "guidance": (-100.0, 100.0), "image_guidance": (-100.0, 100.0)}
    for name, (low, high) in bounds.items():
        if name in values and not low <= values[name] <= high:
            raise ServeError(400, f"field '{name}' must be between {low} and {high} on this server, got {values[name]}")
    return EditParams(**values)


async def read_fields(request) -> tuple[dict, bytes]:
    """(fields, image bytes) of a multipart/form-data or JSON request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ServeError(400, "no image: send the image as the multipart file field 'image'")
        data = await upload.read()
        fields = {k: v for k, v in form.multi_items() if k != "image"}
        return fields, data
    if kind == "application/json":
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(400, f"the body is not valid JSON ({first_line(e)})") from None
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise ServeError(400, 'JSON body must be an object with "image" (base64 PNG/JPEG) and "instruction"')
        encoded = body.pop("image")
        encoded = encoded.split(",", 1)[1] if encoded.startswith("data:") else encoded  # a data: URL works too
        try:
            return body, base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(400, '"image" is not valid base64; encode the image file\'s bytes with base64') from None
    raise ServeError(415, "send the edit as multipart/form-data (file field 'image') or application/json (base64 'image')")


def decode_image(data: bytes, settings, resolution: int | None) -> Image.Image:
    """The RGB image to edit, at the size it is answered at (the pipeline edits at sides rounded down to its VAE's
    multiple; the answer is resized back, as `adapterkit edit` does); 400 for non-images, bombs and tiny images."""
    if not data:
        raise ServeError(400, "the image is empty; send an image file (PNG, JPEG, WebP)")
    heif_support()  # before the header probe: HEIC needs Pillow's plugin registered
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
        if width * height > settings.max_pixels:
            raise Image.DecompressionBombError(f"{width} x {height} pixels")
        if resolution is not None and width * height * (resolution / min(width, height)) ** 2 > settings.max_pixels:
            raise ServeError(400, f"a {width} x {height} image resized to resolution {resolution} would exceed "
                                  f"{settings.max_pixels} pixels; crop it closer to a square or lower the resolution")
        image = read_rgb(io.BytesIO(data))  # decodes under adapterkit.inference's pixel cap
    except Image.DecompressionBombError:
        raise ServeError(400, f"image too large (a decompression bomb?): this server takes at most {settings.max_pixels} "
                              "pixels; downscale it first") from None
    except UnidentifiedImageError:
        if is_heif(data[:16]) and not heif_support():
            raise ServeError(400, f"a HEIC photo, which this server reads only with the pillow-heif plugin installed "
                                  f"({HEIF_FIX}); send a JPEG or PNG") from None
        raise ServeError(400, "not an image: send a PNG, JPEG or WebP file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ServeError(400, f"cannot read the image ({first_line(e)}); send a complete PNG, JPEG or WebP file") from None
    if too_small_to_edit(image, resolution):
        raise ServeError(400, f"image is {image.width} x {image.height} pixels; send at least {MIN_EDIT_SIDE} x "
                              f"{MIN_EDIT_SIDE}, or pass resolution (the shorter side) to scale it up")
    return resize_for_edit(image, resolution)
