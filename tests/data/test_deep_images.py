"""16-bit and float grayscale images are scaled to 8 bits on every decode path, never clipped (PIL's own
convert("L") turns a 16-bit gradient 99.6% white)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import Manifest, build_loader
from pipeline.data.samples import faults
from pipeline.data.samples.images import to_mode, to_uint8
from tests.conftest import TINY, run_cli
from tests.support.faulty_shards import write_set

GRADIENT = np.linspace(0, 65535, 64).round().astype(np.uint16).reshape(8, 8)  # spans the whole 16-bit range


def _png16(pixels: np.ndarray = GRADIENT) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_is_scaled_not_clipped() -> None:
    image = Image.open(io.BytesIO(_png16()))
    assert image.mode == "I;16"
    assert (np.asarray(image.convert("L")) == 255).mean() > 0.9  # what PIL alone does
    gray = np.asarray(to_mode(image, "L"))
    assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255
    assert (gray == 255).sum() == 1  # only the brightest pixel
    assert np.array_equal(gray, np.rint(GRADIENT / 257).astype(np.uint8))
    assert np.all(np.diff(gray.ravel().astype(int)) >= 0)  # the order of the pixels is kept
    rgb = np.asarray(to_mode(Image.open(io.BytesIO(_png16())), "RGB"))
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)


def test_float_and_32_bit_images_follow_the_documented_rules() -> None:
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    assert np.array_equal(to_uint8(unit), np.rint(unit * 255).astype(np.uint8))
    wide = np.linspace(-3, 5, 64, dtype=np.float32).reshape(8, 8)  # outside 0..1: min-max
    assert to_uint8(wide).min() == 0 and to_uint8(wide).max() == 255
    big = np.linspace(0, 2**20, 64).astype(np.int32).reshape(8, 8)  # beyond 16 bits: min-max
    assert to_uint8(big)[0, 0] == 0 and to_uint8(big)[-1, -1] == 255
    assert np.array_equal(to_uint8(GRADIENT.astype(np.int32)), to_uint8(GRADIENT))  # mode I holding 16-bit values
    assert not to_uint8(np.full((2, 2), 7.0, dtype=np.float32)).any()  # flat: no division by zero
    assert np.asarray(to_mode(Image.fromarray(unit), "L")).max() == 255


@pytest.mark.parametrize("decode_device", ["workers", "cpu"])
def test_the_loader_feeds_16_bit_images_at_full_range(decode_device: str, tmp_path: Path) -> None:
    samples = [{"__key__": f"{i:08d}", "png": _png16(GRADIENT if i % 2 else GRADIENT[::-1]), "cls": str(i % 2).encode()}
               for i in range(8)]
    root = tmp_path / "shards"
    write_set(root, samples, shard_size=4, classes=["a", "b"])
    cfg = load_config(None, [f"data.root={root}", "data.channels=1", "data.image_size=8", "data.mean=[0]",
                             "data.std=[1]", "train.eval_batch_size=8", f"data.decode_device={decode_device}"])
    split = build_loader(cfg, Manifest.read(root), "test", 0, 1, train=False)
    split.set_position(0)
    batches = list(split.loader)  # one per worker
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert len(labels) == 8
    pixels = (images[labels == 1][0, 0].numpy() * 255).round()
    assert np.array_equal(pixels, np.rint(GRADIENT / 257)), pixels
    counts = dict(zip(faults.FIELDS, split.bad_samples.total.tolist()))
    assert counts["seen"] == 8 and sum(counts[r] for r in faults.SKIP_REASONS) == 0  # none skipped
    assert counts["converted_mode"] == 8  # the set says RGB: each is counted as converted, and used


def test_shards_and_training_over_16_bit_pngs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for label in ("dark", "bright"):
        (src / label).mkdir(parents=True)
        for i in range(12):
            base = GRADIENT // 4 + (0 if label == "dark" else 40000) + i
            Image.fromarray(base.astype(np.uint16)).save(src / label / f"{i}.png")
    run_cli(["data", "shards", str(src), str(tmp_path / "shards"), "--split", "0.5,0.25,0.25"])
    assert Manifest.read(tmp_path / "shards").image_mode == "I;16"
    result = run_cli(["train", f"data.root={tmp_path / 'shards'}", *TINY, "data.channels=1", "data.mean=[0.5]",
                      "data.std=[0.5]", "train.epochs=1", "train.batch_size=4", "data.num_workers=0",
                      f"run.output_dir={tmp_path / 'runs'}"])
    assert "skipped" not in result.stderr
