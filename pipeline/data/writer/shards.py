"""Turn an ImageFolder (or a CSV of path,label) into WebDataset tar shards plus manifest.json.

Samples are split train/val/test by the source's own split folders when it has them (train/, val/,
test/ and their aliases), else by a seeded split stratified for the task (`pipeline.data.writer.stratify`: by class,
by label set, by quantile bins); shuffled within each split, and written as `<split>-NNNNNN.tar` with keys
`<index>.<ext>` (original image bytes, never re-encoded) and the label (`LABEL_KEYS`): `<index>.cls` (the class
index), or for a CSV of label sets or numbers `<index>.json` holding {"labels": [class names]} or
{"target": [numbers]}.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds

from pipeline.data.dataset.index import add_targets, target_stats
from pipeline.data.dataset.keys import TargetLabel
from pipeline.data.dataset.manifest import SPLITS, Manifest, ShardInfo, SplitInfo
from pipeline.data.writer.sources import IMAGE_EXTENSIONS, SourceImage, Sources, scan_source
from pipeline.data.writer.stratify import METHODS, stratified_split
from pipeline.errors import short_error
from pipeline.tracking.console import progress_bar, warn

SOURCES_NAME = "sources.csv"
"""Written beside manifest.json: split, shard, key, class (label) and source path of every sample (provenance)."""
LABEL_KEYS = {"classification": "cls", "multilabel": "json.labels", "regression": "json.target"}
"""task -> the data.label_key the written shards are read with (the member, and json field, holding the label)."""


@dataclass(frozen=True)
class ImageCheck:
    """A source image as decoded by the writer: its mode and size, or why it could not be read."""

    mode: str = ""
    size: tuple[int, int] = (0, 0)
    error: str = ""
    sha256: str = ""
    """Of the file's bytes (empty if it cannot be read): byte-identical sources are reported."""


def check_image(path: Path) -> ImageCheck:
    """Decode the whole image (PIL `load`), as the loader will, and hash its bytes; never raises."""
    import io

    from pipeline.data.samples.images import open_image

    digest = ""
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        with open_image(io.BytesIO(data)) as image:
            image.load()
            return ImageCheck(image.mode, image.size, sha256=digest)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unreadable"
        return ImageCheck(error=short_error(exc, limit=100), sha256=digest)


def check_images(images: Sequence[SourceImage], show_progress: bool) -> list[ImageCheck]:
    """`check_image` for every source image, in order (threads: PIL releases the GIL while decoding)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    checks = []
    with progress_bar(enabled=show_progress) as progress, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        task = progress.add_task("checking images", total=len(images))
        for check in pool.map(check_image, [im.path for im in images], chunksize=64):
            checks.append(check)
            progress.advance(task)
    return checks


def unreadable_message(src: Path, bad: list[tuple[SourceImage, ImageCheck]], total: int) -> str:
    """One line: how many images cannot be decoded, the first few by name with the reason."""
    shown = "; ".join(f"{im.path} ({check.error})" for im, check in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"{len(bad)} of {total} image(s) in '{src}' cannot be decoded: {shown}{more}"


def _most_common(values: Sequence) -> tuple:
    from collections import Counter

    counts = Counter(values)
    return counts.most_common(1)[0] if counts else (None, 0)


def _carve_fractions(sources: Sources, fractions: Sequence[float], val_fraction: float | None) -> dict[str, float]:
    """Shares of the train folder that become val / test, for the splits a source has no folder for."""
    has = sources.split_folders
    if val_fraction is not None and "val" in has:
        raise ValueError(f"--val-fraction carves val from train, but the source has a val folder ({has['val']}/); "
                         "leave it out")
    carve = {"val": fractions[1] if val_fraction is None else val_fraction, "test": fractions[2]}
    carve = {split: share for split, share in carve.items() if split not in has and share > 0}
    if not 0 <= sum(carve.values()) < 1:
        raise ValueError(f"val/test shares {carve} carved from {has['train']}/ must be at least 0 and sum below 1")
    return carve


def assign_splits(sources: Sources, fractions: Sequence[float], seed: int,
                  val_fraction: float | None = None) -> tuple[list[np.ndarray], dict[str, float]]:
    """Indices of train/val/test (each shuffled) and the shares carved from the train folder.

    Without split folders: a split of all images by `fractions`, stratified for the source's task. With them (an
    ImageFolder: classification): each folder's
    images stay in its split, and a split with no folder is carved from train, stratified and seeded
    (val by `val_fraction`, else `fractions[1]`; test by `fractions[2]`), as a share of train.
    Every image lands in exactly one split (asserted).
    """
    labels = [im.label for im in sources.images]
    if not sources.split_folders:
        parts = stratified_split(labels, fractions, seed, sources.task, len(sources.classes))
        carve: dict[str, float] = {}
    else:
        rng = np.random.default_rng(seed)
        by_split = {split: rng.permutation([i for i, im in enumerate(sources.images) if im.split == split])
                    .astype(np.int64) for split in SPLITS}
        carve = _carve_fractions(sources, fractions, val_fraction)
        if carve:
            train = by_split["train"]
            shares = (1 - sum(carve.values()), carve.get("val", 0.0), carve.get("test", 0.0))
            for split, part in zip(SPLITS, stratified_split([labels[i] for i in train], shares, seed)):
                if split == "train" or split in carve:
                    by_split[split] = train[part]
        parts = [by_split[split] for split in SPLITS]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels))), "splits must partition the images"
    return parts, carve


def duplicate_groups(sources: Sources, checks: Sequence[ImageCheck], split_of: dict[int, str]) -> list[dict]:
    """Groups of byte-identical source files under different paths: sha256 and each file's path, class (label text),
    split."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, check in enumerate(checks):
        by_hash[check.sha256].append(i)
    images = sources.images
    return [{"sha256": digest, "files": [{"path": str(images[i].path), "class": sources.label_text(images[i].label),
                                          "split": split_of[i]} for i in group]}
            for digest, group in by_hash.items() if len(group) > 1]


def duplicate_message(group: dict) -> str:
    """One line for one group of byte-identical files, saying when they cross classes or splits."""
    files = group["files"]
    crosses = [what for what, key in (("classes", "class"), ("splits", "split")) if len({f[key] for f in files}) > 1]
    across = f" across {' and '.join(crosses)}" if crosses else ""
    shown = ", ".join(f"{f['path']} ({f['class']}, {f['split']})" for f in files[:3])
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return f"{len(files)} byte-identical source files{across} (sha256 {group['sha256'][:12]}): {shown}{more}"


def warn_duplicates(groups: list[dict], shown: int = 5) -> None:
    """A warning line per group of byte-identical files (the first few), then how many more there are."""
    for group in groups[:shown]:
        warn(duplicate_message(group))
    if len(groups) > shown:
        warn(f"and {len(groups) - shown} more group(s) of byte-identical source files; all are in "
             "manifest.json's duplicate_sources")


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class RollingTarWriter:
    """Write samples into `<prefix>-NNNNNN.tar`, starting a new shard at the count/byte limit."""

    def __init__(self, out: Path, prefix: str, max_samples: int, max_bytes: int):
        self.out, self.prefix, self.max_samples, self.max_bytes = out, prefix, max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self._writer: wds.TarWriter | None = None
        self._count = self._bytes = 0

    def _roll(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._writer = wds.TarWriter(str(self.out / name))
        self.shards.append(ShardInfo(name=name, num_samples=0, num_bytes=0, sha256=""))
        self._count = self._bytes = 0

    def write(self, sample: dict) -> None:
        full = self._count >= self.max_samples or (self._count > 0 and self._bytes >= self.max_bytes)
        if self._writer is None or full:
            self._roll()
        assert self._writer is not None
        self.shards[-1].offsets.append(self._writer.tarstream.offset)  # where the sample's first header goes
        self._writer.write(sample)
        self._count += 1
        self._bytes = self._writer.tarstream.offset  # real bytes written, tar headers included
        self.shards[-1].num_samples = self._count

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            info = self.shards[-1]
            path = self.out / info.name
            info.num_bytes, info.sha256 = path.stat().st_size, _sha256(path)


def _check_sources(src: Path, sources: Sources, skip_bad: bool,
                   show_progress: bool) -> tuple[Sources, list[ImageCheck], list[str]]:
    """Decode and hash every image: the readable sources, their checks, and 'path: reason' of those skipped."""
    images = sources.images
    if len(images) == 0:
        raise ValueError(f"no images found in '{src}' (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    missing = [str(im.path) for im in images if not im.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed image(s) do not exist, first: {missing[0]}")
    checks = check_images(images, show_progress)
    bad = [(im, check) for im, check in zip(images, checks) if check.error]
    if bad and not skip_bad:
        raise ValueError(unreadable_message(src, bad, len(images)) + "; fix or remove them, or pass --skip-bad")
    if bad:
        warn(unreadable_message(src, bad, len(images)) + "; skipped (--skip-bad)")
        good = [i for i, check in enumerate(checks) if not check.error]
        images, checks = [images[i] for i in good], [checks[i] for i in good]
        if not images:
            raise ValueError(f"no image in '{src}' can be decoded")
    kept = Sources(images, sources.classes, sources.split_folders, sources.notes, sources.task)
    return kept, checks, [f"{im.path}: {check.error}" for im, check in bad]


def _write_split(out: Path, split: str, indices: np.ndarray, sources: Sources, limits: tuple[int, int],
                 rows: list[list[str]], advance) -> SplitInfo:
    """Write one split's shards in `indices` order; append each sample's provenance row to `rows`."""
    writer = RollingTarWriter(out, split, *limits)
    for position, index in enumerate(indices):
        image = sources.images[int(index)]
        ext = image.path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        key = f"{position:08d}"
        writer.write({"__key__": key, ext: image.path.read_bytes(),
                      **label_member(image.label, sources.classes, sources.task)})
        rows.append([split, writer.shards[-1].name, key, sources.label_text(image.label), str(image.path)])
        advance()
    writer.close()
    return split_info([sources.images[int(i)].label for i in indices], sources.classes, sources.task, writer.shards)


def label_member(label: TargetLabel, classes: Sequence[str], task: str) -> dict[str, bytes]:
    """The member holding a written sample's label (`LABEL_KEYS`): `cls` (the class index as text), or `json` with
    {"labels": [class names]} (multilabel) or {"target": [numbers]} (regression)."""
    if task == "classification":
        return {"cls": str(label).encode()}
    value = [classes[i] for i in label] if task == "multilabel" else list(label)
    return {"json": json.dumps({LABEL_KEYS[task].partition(".")[2]: value}).encode()}


def split_info(labels: Sequence[TargetLabel], classes: Sequence[str], task: str, shards: list[ShardInfo]) -> SplitInfo:
    """A written split's manifest entry: samples per class; multilabel: positives per class; regression: labelled
    samples per output, and the targets' {count, mean, std} (they standardise the targets in training)."""
    if task == "regression":
        sums: dict = {}
        for label in labels:
            add_targets(sums, label)
        return SplitInfo(num_samples=len(labels), class_counts={name: len(labels) for name in classes}, shards=shards,
                         targets=target_stats([sums]))
    counts = Counter(i for label in labels for i in (label if task == "multilabel" else (label,)))
    return SplitInfo(num_samples=len(labels), class_counts={name: counts[i] for i, name in enumerate(classes)},
                     shards=shards)


def _write_sources_csv(out: Path, rows: list[list[str]]) -> None:
    with open(out / SOURCES_NAME, "w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["split", "shard", "key", "class", "path"])
        table.writerows(rows)


def write_shards(src: str | Path, out_dir: str | Path, *, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 max_samples: int = 1000, max_bytes: int = 1 << 30, seed: int = 0,
                 show_progress: bool = True, skip_bad: bool = False, dedupe: bool = False,
                 val_fraction: float | None = None, task: str = "classification") -> Manifest:
    """Write train/val/test shards of the ImageFolder or CSV at `src` into `out_dir`.

    `task` says what a CSV's label is (`pipeline.data.writer.sources`: a class, a label set, numbers; an ImageFolder is
    classification only) and how it is written (`LABEL_KEYS`). Split folders in `src` are kept (see
    `assign_splits`); otherwise the split is stratified for the task by `fractions`. Every image is decoded first.
    Unreadable ones stop the writer before anything is written (a ValueError naming them), or with `skip_bad` are
    left out, listed in `manifest.skipped_sources` and warned about. A CSV's repeated rows are refused unless `dedupe`.
    Byte-identical files under different paths are warned about and listed in
    `manifest.duplicate_sources`. `sources.csv` records where each sample came from.
    """
    src, out = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"source '{src}' does not exist; give an ImageFolder root or a CSV of path,label")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {list(fractions)} must be three non-negative numbers summing to 1")
    if max_samples < 1 or max_bytes < 1:
        raise ValueError("max samples and max bytes per shard must be positive")
    sources = scan_source(src, dedupe, task)
    for note in sources.notes:
        warn(note)
    sources, checks, skipped = _check_sources(src, sources, skip_bad, show_progress)
    split_indices, carved = assign_splits(sources, fractions, seed, val_fraction)
    split_of = {int(i): split for split, indices in zip(SPLITS, split_indices) for i in indices}
    duplicates = duplicate_groups(sources, checks, split_of)
    warn_duplicates(duplicates)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, SplitInfo] = {}
    rows: list[list[str]] = []
    with progress_bar(enabled=show_progress) as progress:
        writing = progress.add_task("writing shards", total=len(sources.images))
        for split, indices in zip(SPLITS, split_indices):
            splits[split] = _write_split(out, split, indices, sources, (max_samples, max_bytes), rows,
                                         lambda: progress.advance(writing))
    _write_sources_csv(out, rows)
    image_mode = _most_common([c.mode for c in checks])[0]
    size, same_size = _most_common([c.size for c in checks])
    total = len(sources.images)
    shares = [round(len(i) / total, 6) for i in split_indices] if sources.split_folders else list(fractions)
    manifest = Manifest(classes=sources.classes, splits=splits, source=str(src), seed=seed, split_fractions=shares,
                        image_mode=image_mode, image_size=list(size) if same_size == len(checks) else None,
                        skipped_sources=skipped, split_source="folders" if sources.split_folders else METHODS[task],
                        split_folders=dict(sources.split_folders), carved_from_train=carved,
                        duplicate_sources=duplicates, task=task, label_key=LABEL_KEYS[task])
    manifest.write(out)
    return manifest


def ensure_digits_shards(root: str | Path, max_samples: int = 64) -> Manifest:
    """Make the bundled digits shards at `root` if it has no manifest yet (fresh-checkout demo).

    Shards are written to a sibling staging folder and renamed into place, so a crash never leaves
    a half-written folder that looks complete.
    """
    import shutil
    import tempfile

    from pipeline.data.writer.digits import write_digits_imagefolder

    root = Path(root)
    if (root / "manifest.json").is_file():
        return Manifest.read(root)
    if root.exists() and any(root.iterdir()):
        raise FileNotFoundError(f"'{root}' exists but has no manifest.json; remove it or point data.root elsewhere")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_digits_imagefolder(tmp)
        write_shards(tmp, staging, max_samples=max_samples, show_progress=False)
    if root.exists():
        root.rmdir()
    staging.replace(root)
    return Manifest.read(root)
