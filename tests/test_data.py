"""Shards, manifest and the resumable stream: exact counts, determinism, exact-once evaluation."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import Manifest, build_loader
from pipeline.data.digits import write_digits_imagefolder
from pipeline.data.shards import write_shards
from pipeline.data.stream import epoch_shard_order, slot_segments


def _cfg(root: Path, *overrides: str):
    return load_config(None, [f"data.root={root}", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]",
                              "data.image_size=8", *overrides])


def test_digits_manifest_counts_and_hashes(digits_root: Path) -> None:
    manifest = Manifest.read(digits_root)
    assert manifest.classes == [str(i) for i in range(10)]
    counts = {name: split.num_samples for name, split in manifest.splits.items()}
    assert counts == {"train": 1257, "val": 270, "test": 270}
    for split in manifest.splits.values():
        assert sum(s.num_samples for s in split.shards) == split.num_samples
        assert sum(split.class_counts.values()) == split.num_samples
        assert all(s.num_samples <= 64 for s in split.shards)
        for shard in split.shards:
            data = (digits_root / shard.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.num_bytes
            with tarfile.open(digits_root / shard.name) as tar:
                assert len([m for m in tar.getmembers() if m.name.endswith(".png")]) == shard.num_samples
    # Stratified: every class's share of the test split is within one sample of its share overall.
    totals = {c: sum(s.class_counts[c] for s in manifest.splits.values()) for c in manifest.classes}
    for c in manifest.classes:
        assert abs(manifest.splits["test"].class_counts[c] - totals[c] * 0.15) <= 1


def test_imagefolder_and_csv_sources_with_byte_limit(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    assert write_digits_imagefolder(folder) == 1797
    manifest = write_shards(folder, tmp_path / "shards", max_samples=10_000, max_bytes=20_000, show_progress=False)
    assert all(s.num_bytes <= 20_000 + 5_000 + 10_240 for s in manifest.splits["train"].shards)  # + 1 sample + end
    assert len(manifest.splits["train"].shards) > 1
    rows = ["path,label"] + [f"images/{p.parent.name}/{p.name},{'even' if int(p.parent.name) % 2 == 0 else 'odd'}"
                             for p in sorted(folder.rglob("*.png"))[:200]]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    from_csv = write_shards(tmp_path / "list.csv", tmp_path / "csv_shards", max_samples=50, show_progress=False)
    assert from_csv.classes == ["even", "odd"]
    assert sum(s.num_samples for s in from_csv.splits.values()) == 200


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 1), (2, 2), (3, 2)])
def test_training_ranks_get_equal_steps_and_disjoint_samples(digits_root: Path, world: int, workers: int) -> None:
    cfg = _cfg(digits_root, f"data.num_workers={workers}", "train.batch_size=32")
    manifest = Manifest.read(digits_root)
    steps, seen = [], []
    for rank in range(world):
        split = build_loader(cfg, manifest, "train", rank, world, train=True)
        split.set_position(epoch=1)
        batches = list(split.loader)
        assert len(batches) == split.stream.steps_per_epoch()
        steps.append(len(batches))
        seen.append(sum(len(labels) for _, labels in batches))
    assert len(set(steps)) == 1
    slots = world * max(1, workers)
    assert sum(seen) == 1257 // slots * slots  # at most slots-1 samples left out, different ones each epoch


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_evaluation_counts_every_sample_exactly_once(digits_root: Path, world: int, workers: int) -> None:
    cfg = _cfg(digits_root, f"data.num_workers={workers}", "train.eval_batch_size=50")
    manifest = Manifest.read(digits_root)
    labels = []
    for rank in range(world):
        split = build_loader(cfg, manifest, "val", rank, world, train=False)
        split.set_position(0)
        labels.extend(int(label) for _, batch in split.loader for label in batch)
    assert len(labels) == manifest.splits["val"].num_samples == 270
    # Per-class counts equal the manifest's: nothing duplicated to pad a rank, nothing dropped.
    counts = {name: labels.count(index) for index, name in enumerate(manifest.classes)}
    assert counts == manifest.splits["val"].class_counts


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert epoch_shard_order(20, 0, 3, True) == epoch_shard_order(20, 0, 3, True)
    assert epoch_shard_order(20, 0, 3, True) != epoch_shard_order(20, 0, 4, True)
    assert epoch_shard_order(5, 0, 3, False) == [0, 1, 2, 3, 4]
    segments = slot_segments([10, 10, 10], [2, 0, 1], 5, 25)
    assert [(s.shard, s.start, s.stop) for s in segments] == [(2, 5, 10), (0, 0, 10), (1, 0, 5)]


@pytest.mark.parametrize("workers, start", [(0, 7), (2, 7), (2, 8), (3, 10)])
def test_restart_at_any_step_reproduces_the_remaining_batches(digits_root: Path, workers: int, start: int) -> None:
    cfg = _cfg(digits_root, f"data.num_workers={workers}", "train.batch_size=32", "data.augment.rotation=15")
    manifest = Manifest.read(digits_root)
    full = build_loader(cfg, manifest, "train", 0, 1, train=True)
    full.set_position(2, 0)
    reference = list(full.loader)
    resumed = build_loader(cfg, manifest, "train", 0, 1, train=True)
    resumed.set_position(2, start)
    rest = list(resumed.loader)
    assert len(rest) == len(reference) - start
    for (a, la), (b, lb) in zip(reference[start:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_grayscale_digits_convert_to_rgb(digits_root: Path) -> None:
    cfg = load_config(None, [f"data.root={digits_root}", "data.image_size=8", "data.num_workers=0",
                             "data.mean=[0.5]", "data.std=[0.5]"])
    split = build_loader(cfg, Manifest.read(digits_root), "test", 0, 1, train=False)
    split.set_position(0)
    images, labels = next(iter(split.loader))
    assert images.shape[1:] == (3, 8, 8) and labels.dtype == torch.long
    assert torch.equal(images[:, 0], images[:, 1])  # gray replicated to RGB
