"""WebDataset shards as other tools write them (webdataset's ShardWriter), for the tests of foreign datasets.

scikit-learn's digits (1,797 images, 10 classes), split by a fixed permutation into train 1,200,
val 300, test 297, written as `FORMATS` say: the image key, the label key and how the label is
stored, and whether the shards are gzipped.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np

SPLITS = {"train": (0, 1200), "val": (1200, 1500), "test": (1500, 1797)}
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FORMATS = {
    "jpg+cls": ("jpg", "cls"),
    "jpg+json": ("jpg", "json"),
    "png+txt": ("png", "txt"),
    "tar.gz": ("jpg", "cls"),
}


def _image(pixels: np.ndarray, ext: str) -> bytes:
    from PIL import Image

    image = Image.fromarray((pixels * 15).clip(0, 255).astype(np.uint8)).resize((16, 16)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if ext == "jpg" else "PNG", quality=95)
    return buffer.getvalue()


def _label(form: str, target: int) -> object:
    if form == "jpg+json":
        return json.dumps({"annotation": {"label": int(target)}, "source": "digits"}).encode()
    if form == "png+txt":
        return NAMES[target]
    return int(target)


def write(folder: Path, form: str, per_shard: int = 250) -> dict[str, int]:
    """Shards `<split>-NNNNNN.tar` (or .tar.gz) in `folder`; returns the samples per split."""
    import webdataset as wds
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    image_key, label_key = FORMATS[form]
    folder.mkdir(parents=True, exist_ok=True)
    for split, (lo, hi) in SPLITS.items():
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in order[lo:hi]:
                sink.write({"__key__": f"d{i:05d}", image_key: _image(digits.images[i], image_key),
                            label_key: _label(form, int(digits.target[i]))})
    if form == "tar.gz":
        for tar in sorted(folder.glob("*.tar")):
            with open(tar, "rb") as src, gzip.open(f"{tar}.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            tar.unlink()
    return {split: hi - lo for split, (lo, hi) in SPLITS.items()}


def write_class_sorted(folder: Path, sort: bool = True) -> dict[str, list[str]]:
    """Digits as a user's `ShardWriter` loop over an ImageFolder writes them: `train/` in class order, one class per
    shard (sort=False: the same images and shard sizes, shuffled), `val/` and `test/` shuffled; 8x8 grayscale
    PNGs as our digits demo. Returns the shard paths per split (for data.train / data.val / data.test)."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)

    def sample(i: int) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(pixels[i], mode="L").save(buffer, format="PNG")
        return {"__key__": f"d{i:05d}", "png": buffer.getvalue(), "cls": int(digits.target[i])}

    train = order[slice(*SPLITS["train"])]
    by_class = [[i for i in train if digits.target[i] == c] for c in range(10)]
    chunks = by_class if sort else np.array_split(train, np.cumsum([len(c) for c in by_class])[:-1])
    paths: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for split in paths:
        (folder / split).mkdir(parents=True, exist_ok=True)
    for number, chunk in enumerate(chunks):
        paths["train"].append(str(folder / "train" / f"train-{number:06d}.tar"))
        with wds.TarWriter(paths["train"][-1]) as sink:
            for i in chunk:
                sink.write(sample(int(i)))
    for split in ("val", "test"):
        paths[split].append(str(folder / split / f"{split}-000000.tar"))
        with wds.TarWriter(paths[split][-1]) as sink:
            for i in order[slice(*SPLITS[split])]:
                sink.write(sample(int(i)))
    return paths
