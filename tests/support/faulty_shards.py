"""A small set of shards with known faults (undecodable, RGBA, unlabelled, out-of-range samples), and the writer
that makes train, val and test splits of any samples with their manifest."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import Manifest
from pipeline.data.dataset.manifest import SplitInfo
from pipeline.data.writer.shards import RollingTarWriter

CLASSES = ["a", "b", "c", "d"]
UNDECODABLE, RGBA, NO_LABEL, BAD_LABEL = (3, 17, 29), (8, 22), 12, 35


def random_png(seed: int, mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> bytes:
    """A PNG of seeded random pixels (8x8 RGB by default)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def faulty_samples(n: int = 40) -> list[dict]:
    """40 RGB 8x8 samples of 4 classes: 3 undecodable, 2 RGBA, 1 without a label, 1 with label 7."""
    samples = []
    for i in range(n):
        sample = {"__key__": f"{i:08d}", "png": random_png(i), "cls": str(i % 4).encode()}
        if i in UNDECODABLE:
            sample["png"] = random_png(i)[:40] if i % 3 else b"this is not an image"
        if i in RGBA:
            sample["png"] = random_png(i, "RGBA")
        if i == NO_LABEL:
            del sample["cls"]
        if i == BAD_LABEL:
            sample["cls"] = b"7"
        samples.append(sample)
    return samples


def write_set(root: Path, samples: list[dict], shard_size: int = 10, classes: list[str] = CLASSES) -> Manifest:
    """The same samples as train, val and test shards, with a manifest saying RGB 8x8."""
    root.mkdir(parents=True)
    splits = {}
    for split in ("train", "val", "test"):
        writer = RollingTarWriter(root, split, shard_size, 1 << 30)
        for sample in samples:
            writer.write(sample)
        writer.close()
        splits[split] = SplitInfo(len(samples), {c: len(samples) // len(classes) for c in classes}, writer.shards)
    manifest = Manifest(classes=classes, splits=splits, image_mode="RGB", image_size=[8, 8])
    manifest.write(root)
    return manifest
