"""Tiny WebDataset shards with multi-label and regression labels (json), from scikit-learn's digits.

Each digit d (a 16 x 16 JPEG) is labelled with
- `tags`: the subset of MULTILABEL_CLASSES it has: even (d % 2 == 0), small (d < 5), round (d in 0, 6, 8, 9);
  5 and 7 have none (an empty list);
- `targets`: [d, the image's mean ink 0..16] (two regression outputs), and `digit`: d alone (one output).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

MULTILABEL_CLASSES = ("even", "small", "round")
SPLITS = {"train": (0, 600), "val": (600, 750), "test": (750, 900)}


def tags(digit: int) -> list[str]:
    found = {"even": digit % 2 == 0, "small": digit < 5, "round": digit in (0, 6, 8, 9)}
    return [name for name in MULTILABEL_CLASSES if found[name]]


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray((pixels * 15).clip(0, 255).astype(np.uint8)).resize((16, 16)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def digits_of(split: str) -> list[int]:
    """The digit of every sample of `split`, in write order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    lo, hi = SPLITS[split]
    return [int(digits.target[i]) for i in order[lo:hi]]


def write(folder: Path, per_shard: int = 150) -> dict[str, str]:
    """Shards `<split>-NNNNNN.tar` in `folder`; returns a brace-free glob per split (for data.train/val/test)."""
    import webdataset as wds
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    folder.mkdir(parents=True, exist_ok=True)
    for split, (lo, hi) in SPLITS.items():
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in order[lo:hi]:
                d = int(digits.target[i])
                label = {"tags": tags(d), "targets": [float(d), float(digits.images[i].mean())], "digit": d}
                sink.write({"__key__": f"d{i:05d}", "jpg": _jpeg(digits.images[i]), "json": json.dumps(label).encode()})
    return {split: str(folder / f"{split}-*.tar") for split in SPLITS}
