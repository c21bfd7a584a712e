"""Turn an ImageFolder (or a CSV of path,label) into WebDataset tar shards plus manifest.json.

Samples are split train/val/test with scikit-learn's stratified split (seeded), shuffled within
each split, and written as `<split>-NNNNNN.tar` with keys `<index>.<ext>` (original image bytes,
never re-encoded) and `<index>.cls` (the class index).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds

from pipeline.data.manifest import SPLITS, Manifest, ShardInfo, SplitInfo
from pipeline.tracking.console import progress_bar, warn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")


@dataclass(frozen=True)
class SourceImage:
    path: Path
    label: int


def scan_imagefolder(root: Path) -> tuple[list[SourceImage], list[str]]:
    """Class folders sorted by name, as torchvision's ImageFolder orders them."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"'{root}' has no class sub-folders; expected ROOT/<class>/<image> files")
    images = [
        SourceImage(path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    return images, classes


def scan_csv(csv_path: Path) -> tuple[list[SourceImage], list[str]]:
    """Rows of `path,label` (header optional; relative paths are relative to the CSV's folder)."""
    rows = [row for row in csv.reader(csv_path.read_text().splitlines()) if row]
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    bad = [i for i, row in enumerate(rows, 1) if len(row) < 2 or not row[1].strip()]
    if bad:
        raise ValueError(f"'{csv_path}' row(s) {bad[:5]} are not 'path,label'")
    classes = sorted({row[1].strip() for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    images = []
    for row in rows:
        path = Path(row[0].strip())
        images.append(SourceImage(path if path.is_absolute() else csv_path.parent / path, index[row[1].strip()]))
    return images, classes


@dataclass(frozen=True)
class ImageCheck:
    """A source image as decoded by the writer: its mode and size, or why it could not be read."""

    mode: str = ""
    size: tuple[int, int] = (0, 0)
    error: str = ""


def check_image(path: Path) -> ImageCheck:
    """Decode the whole image (PIL `load`), as the loader will; never raises."""
    from PIL import Image

    from pipeline.data.faults import short_error

    try:
        with Image.open(path) as image:
            image.load()
            return ImageCheck(image.mode, image.size)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files; all mean "unreadable"
        return ImageCheck(error=short_error(exc, limit=100))


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


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of train/val/test, stratified by label (scikit-learn), each shuffled."""
    train_f, val_f, test_f = fractions
    indices = np.arange(len(labels))
    labels = np.asarray(labels)
    holdout = val_f + test_f
    if holdout == 0:
        return [np.random.default_rng(seed).permutation(indices), indices[:0], indices[:0]]
    from sklearn.model_selection import train_test_split

    train_idx, rest_idx = train_test_split(indices, test_size=holdout, stratify=labels, random_state=seed)
    if val_f == 0 or test_f == 0:
        empty = indices[:0]
        return [train_idx, rest_idx, empty] if test_f == 0 else [train_idx, empty, rest_idx]
    val_idx, test_idx = train_test_split(rest_idx, test_size=test_f / holdout, stratify=labels[rest_idx],
                                         random_state=seed)
    return [train_idx, val_idx, test_idx]


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class _RollingTarWriter:
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


def write_shards(src: str | Path, out_dir: str | Path, *, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 max_samples: int = 1000, max_bytes: int = 1 << 30, seed: int = 0,
                 show_progress: bool = True, skip_bad: bool = False) -> Manifest:
    """Write train/val/test shards of the ImageFolder or CSV at `src` into `out_dir`.

    Every image is decoded first. Unreadable ones stop the writer before anything is written (a
    ValueError naming them), or with `skip_bad` are left out, listed in `manifest.skipped_sources`
    and warned about.
    """
    src, out = Path(src), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"source '{src}' does not exist; give an ImageFolder root or a CSV of path,label")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {list(fractions)} must be three non-negative numbers summing to 1")
    if max_samples < 1 or max_bytes < 1:
        raise ValueError("max samples and max bytes per shard must be positive")
    images, classes = scan_csv(src) if src.is_file() else scan_imagefolder(src)
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
    image_mode = _most_common([c.mode for c in checks])[0]
    size, same_size = _most_common([c.size for c in checks])
    out.mkdir(parents=True, exist_ok=True)
    labels = [im.label for im in images]
    split_indices = stratified_split(labels, fractions, seed)
    splits: dict[str, SplitInfo] = {}
    with progress_bar(enabled=show_progress) as progress:
        task = progress.add_task("writing shards", total=len(images))
        for split, indices in zip(SPLITS, split_indices):
            writer = _RollingTarWriter(out, split, max_samples, max_bytes)
            counts = {name: 0 for name in classes}
            for position, index in enumerate(indices):
                image = images[int(index)]
                ext = image.path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
                writer.write({"__key__": f"{position:08d}", ext: image.path.read_bytes(),
                              "cls": str(image.label).encode()})
                counts[classes[image.label]] += 1
                progress.advance(task)
            writer.close()
            splits[split] = SplitInfo(num_samples=len(indices), class_counts=counts, shards=writer.shards)
    manifest = Manifest(classes=classes, splits=splits, source=str(src), seed=seed, split_fractions=list(fractions),
                        image_mode=image_mode, image_size=list(size) if same_size == len(checks) else None,
                        skipped_sources=[f"{im.path}: {check.error}" for im, check in bad])
    manifest.write(out)
    return manifest


def ensure_digits_shards(root: str | Path, max_samples: int = 64) -> Manifest:
    """Make the bundled digits shards at `root` if it has no manifest yet (fresh-checkout demo).

    Shards are written to a sibling staging folder and renamed into place, so a crash never leaves
    a half-written folder that looks complete.
    """
    import shutil
    import tempfile

    from pipeline.data.digits import write_digits_imagefolder

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
