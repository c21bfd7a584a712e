"""scikit-learn's bundled digits (1,797 real 8x8 images, 10 classes) as an ImageFolder of PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_imagefolder(out_dir: str | Path) -> int:
    """Write `out_dir/<class>/<index>.png` (8-bit grayscale, 8x8); return the number of images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out_dir)
    # The raw values are 0..16; stretch to 0..255 so the PNGs look like ordinary images.
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target)):
        class_dir = out / str(int(label))
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(class_dir / f"{index:05d}.png")
    return len(pixels)
