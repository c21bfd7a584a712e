"""Opening an image safely, and converting it to the mode the model reads without losing what a deep image holds.

`open_image` is how every image is opened (training's inspection, predict, visualize, the shard writer): PIL's
guard against decompression bombs made strict. PIL warns (DecompressionBombWarning) above `Image.MAX_IMAGE_PIXELS`
(89,478,485 pixels) and raises only above twice that; here both raise `ImageTooLarge`, a ValueError whose
message is one line, so the loader counts such an image as an `oversize` bad sample and a command ends with one
line (exit 2). Set `PIL.Image.MAX_IMAGE_PIXELS` to allow larger images. To that end, importing this module turns
DecompressionBombWarning into an error for the whole process (a warnings filter set once: thread-safe, unlike
`warnings.catch_warnings` around each open, and free per image).

PIL's own `convert("L")` clips 16-bit (`I;16`, `I`) and float (`F`) pixels to 0..255: a 16-bit grayscale PNG
(microscopy, medical, depth) becomes almost entirely white. Such images are scaled to 8 bits first:

- 16-bit (`I;16*`, and `I` whose values fit 0..65535): value / 257, rounded (0 -> 0, 65535 -> 255);
- 32-bit integer (`I`) beyond that range, and float (`F`) outside 0..1: min-max scaled to 0..255 per image;
- float (`F`) within 0..1: value x 255, rounded.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
from PIL import Image

DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageTooLarge(ValueError):
    """An image with more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (a decompression bomb, or simply too large)."""


warnings.filterwarnings("error", category=Image.DecompressionBombWarning)  # see the module docstring


def open_image(source) -> Image.Image:
    """`Image.open(source)` (a path or a file object; lazy, as PIL's), raising ImageTooLarge above PIL's pixel limit
    where PIL itself would only warn (or raise its own DecompressionBombError)."""
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(int(found.group(1)) if found else 0) from None
    pixels = image.size[0] * image.size[1]
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:  # the filter was reset (by pytest, a library)
        image.close()
        raise _too_large(pixels)
    return image


def _too_large(pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"the image has {f'{pixels:,}' if pixels else 'more'} pixels, over the "
                         f"{Image.MAX_IMAGE_PIXELS:,} PIL decodes (PIL.Image.MAX_IMAGE_PIXELS, its guard against "
                         "decompression bombs)")


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` in `mode` (L or RGB); deep grayscale images are scaled to 8 bits, never clipped."""
    if image.mode in DEEP_MODES:
        image = Image.fromarray(to_uint8(np.asarray(image)), mode="L")
    return image.convert(mode)  # a loaded copy even when the mode matches (callers close the file after)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """A deep grayscale array as uint8 by the rules in the module docstring."""
    values = pixels.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(values).all():
            values = np.nan_to_num(values, nan=0.0, posinf=high if np.isfinite(high) else 1.0, neginf=0.0)
            low, high = float(values.min()), float(values.max())
        scaled = values * 255.0 if low >= 0.0 and high <= 1.0 else _min_max(values, low, high)
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0
    else:
        scaled = _min_max(values, low, high)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _min_max(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.zeros_like(values) if high <= low else (values - low) * (255.0 / (high - low))
