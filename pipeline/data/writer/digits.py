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


def write_digits_jpeg_imagefolder(out_dir: str | Path, num_images: int, size: int = 224, seed: int = 0,
                                  quality: int = 90, strokes: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """Write `num_images` colour JPEGs of about `size` px made from the digits: `out_dir/<class>/<index>.jpg`.

    For loader benchmarks and tests that need realistic JPEGs without downloading any: each digit is
    upscaled (bicubic) to a random width and height in [size, 1.25 x size], drawn in one random
    colour over a random two-colour gradient, with Gaussian noise so the JPEG has a photo-like size
    (about 30-40 kB at 224-280 px, quality 90). Deterministic given `seed`. `strokes` (8x8 images
    with values 0..16, and their labels) replaces scikit-learn's digits.
    """
    if strokes is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        strokes = (digits.images, digits.target)
    images, targets = strokes
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    for index in range(num_images):
        source = index % len(images)
        label = int(targets[source])
        width, height = (int(v) for v in rng.integers(size, int(size * 1.25) + 1, size=2))
        stroke = Image.fromarray(np.uint8(images[source] * (255.0 / 16.0)), mode="L")
        stroke = np.asarray(stroke.resize((width, height), Image.BICUBIC), dtype=np.float32)[..., None] / 255.0
        ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
        top, bottom, ink = (rng.uniform(0.0, 1.0, 3).astype(np.float32) for _ in range(3))
        background = top * (1 - ys) + bottom * ys + 0.15 * xs
        rgb = background * (1 - stroke) + ink * stroke
        rgb += rng.normal(0.0, 0.06, rgb.shape).astype(np.float32)
        class_dir = out / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.clip(rgb, 0.0, 1.0) * 255.0), mode="RGB").save(
            class_dir / f"{index:06d}.jpg", "JPEG", quality=quality)
    return num_images
