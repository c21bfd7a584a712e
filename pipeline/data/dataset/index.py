"""The index of a shard spec: what exact resume, equal steps per rank and exact evaluation need to know.

Our own shard folders carry this in `manifest.json`. Any other WebDataset shards are read once,
streaming (images are not decoded; `pipeline data verify` does that), and per shard the index records
the sample count, the size, a version (local: size and modification time; remote: ETag or
Last-Modified and size), the labels found (raw: an integer or a class name, counted; task.type=multilabel: each
class of a sample's list counted; regression: count, sum and sum of squares per output, for the targets' mean and
standard deviation), each sample's key and
fingerprint (its image's size and blake2b-8 hash: what finds validation samples that are training samples,
`shared_samples`; 16 bytes a sample, a hash at about 1 GB/s of bytes read anyway), and each sample's byte offset
in the shard (where its first header starts: a reader opens the shard there rather than walking to it, see
`pipeline.data.io.tar`). Indexes written before offsets were recorded have none; they stay valid (the reader then
walks); offsets come when it is rebuilt (a shard changed, or its cache file was deleted). The index is
cached in `data.index_dir` under a name derived from the shard list and the label and image keys, and
reused while every shard still has the version it had; a shard that changed makes the index be
rebuilt, with a warning. Shards read through `pipe:` have no version to compare: their index is
reused as long as the spec is the same (delete the cache file to force a new one).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline.data.dataset.keys import SampleKeys
from pipeline.data.dataset.manifest import SharedSamples
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.stat import stat_shard
from pipeline.data.io.tar import BAD, gzipped, placed_samples
from pipeline.errors import short_error
from pipeline.exits import RemoteError

INDEX_VERSION = 2
"""2: per-sample keys and fingerprints. The version is part of the cache file's name: older caches are rebuilt."""


@dataclass
class ShardEntry:
    """One shard as indexed."""

    url: str
    num_samples: int
    num_bytes: int = 0
    version: str = ""
    """What the shard looked like when indexed (size, mtime or ETag); '' when the transport cannot tell."""
    labels: dict[str, int] = field(default_factory=dict)
    """Raw label (JSON text: 3 or "cat") -> samples; samples without a label are counted under `no_label`."""
    no_label: int = 0
    members: dict[str, int] = field(default_factory=dict)
    """Sample keys (jpg, cls, json ...) -> samples having them: what a wrong data.label_key is told."""
    sha256: str = ""
    error: str = ""
    """Why reading stopped before the end of the tar file ('' when it did not): the count is what was read."""
    keys: list[str] = field(default_factory=list)
    """Each sample's key (`__key__`), in shard order."""
    fingerprints: list[str] = field(default_factory=list)
    """Each sample's `fingerprint` of its image ('' for a sample without one), in shard order."""
    targets: dict = field(default_factory=dict)
    """task.type=regression: {count, sum, sum_sq} of the labels (lists, one value per output) with the length the
    shard's first label has; other lengths are counted under `no_label` (the stream skips them as bad_label)."""
    offsets: list[int] = field(default_factory=list)
    """Each sample's byte offset in the shard (bad ones too: one per sample read), in shard order (.tar.gz: in the
    inflated stream, unused); empty in indexes written before offsets were recorded."""

    def raw_labels(self) -> Counter:
        return Counter({json.loads(k): n for k, n in self.labels.items()})

    def trusted_offsets(self) -> list[int]:
        """The offsets a reader may open the shard at: only a shard's with a version, which every open checks against
        the index's (`ReadOptions.pinned`), so an offset never points into another version of it. `pipe:` output has
        no version and .tar.gz shards cannot be opened mid-stream: both are walked from their start."""
        return self.offsets if self.version and not gzipped(self.url) else []


@dataclass
class SpecIndex:
    """A spec's shards, in order, as indexed."""

    urls: list[str]
    label_key: str
    image_key: str
    shards: list[ShardEntry]
    created: float = 0.0
    version: int = INDEX_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def label_counts(self) -> Counter:
        total: Counter = Counter()
        for shard in self.shards:
            total.update(shard.raw_labels())
        return total

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half an index

    @classmethod
    def read(cls, path: Path) -> "SpecIndex":
        data = json.loads(path.read_text())
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"{path}: index version {data.get('version')} (this pipeline writes {INDEX_VERSION})")
        return cls(**{**data, "shards": [ShardEntry(**s) for s in data["shards"]]})


def index_shard(url: str, keys: SampleKeys, options: ReadOptions | None = None, sha256: bool = False) -> ShardEntry:
    """Read one shard once: its samples, their raw labels, its size and version."""
    size, version = stat_shard(url, options)
    entry = ShardEntry(url=url, num_samples=0, num_bytes=size or 0, version=version)
    labels: Counter = Counter()
    members: Counter = Counter()
    try:
        for offset, sample in placed_samples(url, options=options):
            entry.num_samples += 1
            entry.offsets.append(offset)
            if BAD in sample:  # counted; skipped (and counted as bad) when the stream meets it
                continue
            members.update(k for k in sample if not k.startswith("__"))
            image = keys.image(sample)
            entry.keys.append(str(sample.get("__key__", "")))
            entry.fingerprints.append(fingerprint(sample[image]) if image else "")
            raw, _ = keys.raw_label(sample)
            if raw is None or (keys.task == "regression" and not add_targets(entry.targets, raw)):
                entry.no_label += 1
            elif keys.task == "multilabel":
                labels.update(json.dumps(item) for item in raw)
            elif keys.task == "classification":
                labels[json.dumps(raw)] += 1
    except RemoteError:  # not the shard's fault (404, the server gave up, changed): never cached as its content
        raise
    except Exception as exc:  # noqa: BLE001 - a shard that cannot be read to its end is recorded, not fatal here
        entry.error = short_error(exc)
    entry.labels, entry.members = dict(labels), dict(members)
    if sha256 and not url.startswith("pipe:") and "://" not in url:
        entry.sha256 = _sha256(url)
    return entry


def add_targets(stats: dict, values: Sequence[float]) -> bool:
    """Add a regression label to {count, sum, sum_sq} (per output); False when its length differs from the first's."""
    if not stats:
        stats.update(count=0, sum=[0.0] * len(values), sum_sq=[0.0] * len(values))
    if len(values) != len(stats["sum"]):
        return False
    stats["count"] += 1
    stats["sum"] = [s + v for s, v in zip(stats["sum"], values)]
    stats["sum_sq"] = [s + v * v for s, v in zip(stats["sum_sq"], values)]
    return True


def target_stats(parts: Sequence[dict]) -> dict:
    """{count, mean, std} per output of regression labels from per-shard {count, sum, sum_sq} (population std);
    {} without labels, or when shards hold labels of different lengths."""
    parts = [p for p in parts if p and p.get("count")]
    if not parts or len({len(p["sum"]) for p in parts}) != 1:
        return {}
    count = sum(p["count"] for p in parts)
    sums = [sum(v) for v in zip(*(p["sum"] for p in parts))]
    squares = [sum(v) for v in zip(*(p["sum_sq"] for p in parts))]
    mean = [s / count for s in sums]
    std = [max(q / count - m * m, 0.0) ** 0.5 for q, m in zip(squares, mean)]
    return {"count": count, "mean": mean, "std": std}


def target_sums(stats: dict) -> dict:
    """{count, sum, sum_sq} per output back from `target_stats`' {count, mean, std} (a manifest's), so that
    `target_stats` can combine them with indexed shards; {} for {}."""
    if not stats or not stats.get("count"):
        return {}
    count = stats["count"]
    return {"count": count, "sum": [m * count for m in stats["mean"]],
            "sum_sq": [(s * s + m * m) * count for m, s in zip(stats["mean"], stats["std"])]}


def fingerprint(image: bytes) -> str:
    """A sample's image as '<size in hex>.<blake2b-8 hex>': equal for the same bytes, whatever the key or shard."""
    return f"{len(image):x}.{hashlib.blake2b(image, digest_size=8).hexdigest()}"


def shared_samples(train: SpecIndex, other: SpecIndex, split: str) -> SharedSamples | None:
    """The samples of `other` that `train` holds too (by fingerprint), or None when there are none."""
    seen = {fp: key for entry in train.shards for key, fp in zip(entry.keys, entry.fingerprints) if fp}
    count, examples = 0, []
    for entry in other.shards:
        for key, fp in zip(entry.keys, entry.fingerprints):
            if fp in seen:
                count += 1
                if len(examples) < 3:
                    examples.append((key, seen[fp]))
    return SharedSamples(split, count, other.num_samples, examples) if count else None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_index(urls: Sequence[str], keys: SampleKeys, options: ReadOptions | None = None, sha256: bool = False,
                threads: int = 8, on_shard: Optional[Callable[[ShardEntry], None]] = None) -> SpecIndex:
    """Index `urls` (several shards at a time: reading is mostly waiting for I/O); `on_shard` sees each entry."""
    def one(url: str) -> ShardEntry:
        entry = index_shard(url, keys, options, sha256)
        if on_shard is not None:
            on_shard(entry)
        return entry

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        shards = list(pool.map(one, urls))
    return SpecIndex(urls=list(urls), label_key=keys.label_key, image_key=keys.image_key, shards=shards,
                     created=time.time())


def default_index_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipeline" / "index"


def cache_path(index_dir: str | Path, urls: Sequence[str], keys: SampleKeys) -> Path:
    """The cache file of a shard list read with these keys (classes do not matter: labels are stored raw)."""
    what = {"urls": list(urls), "label_key": keys.label_key, "image_key": keys.image_key, "version": INDEX_VERSION}
    if keys.task != "classification":  # labels are counted another way (classification caches keep their names)
        what["task"] = keys.task
    blob = json.dumps(what)
    return Path(index_dir or default_index_dir()) / f"{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"


def stale_shard(index: SpecIndex, options: ReadOptions | None = None, threads: int = 8) -> str:
    """'' when every shard still has its indexed version, else a line naming the first that changed."""
    def changed(entry: ShardEntry) -> str:
        if not entry.version:
            return ""
        try:
            size, version = stat_shard(entry.url, options)
        except Exception as exc:  # noqa: BLE001 - a shard that cannot be looked at now fails when it is read
            return f"shard {entry.url} cannot be checked ({short_error(exc)})"
        if version != entry.version:
            return f"shard {entry.url} changed ({entry.version} when indexed, now {version})"
        return ""

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(index.shards)))) as pool:
        return next((line for line in pool.map(changed, index.shards) if line), "")


def load_or_build(urls: Sequence[str], keys: SampleKeys, options: ReadOptions | None, index_dir: str,
                  what: str, progress: bool = True, rebuild: bool = False) -> SpecIndex:
    """The cached index of `urls` if it is still true to the shards (and not `rebuild`), else a new one (cached)."""
    from pipeline.tracking.console import warn

    path = cache_path(index_dir, urls, keys)
    if path.is_file() and not rebuild:
        try:
            index = SpecIndex.read(path)
            problem = stale_shard(index, options)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            index, problem = None, f"the cache file {path} cannot be read ({short_error(exc)})"
        if index is not None and not problem:
            return index
        warn(f"{what}: rebuilding its shard index: {problem}")
    index = index_with_progress(urls, keys, options, what, progress)
    try:
        index.write(path)
    except OSError as exc:
        warn(f"{what}: the shard index could not be cached at {path} ({short_error(exc)}); it is rebuilt next time")
    return index


def index_with_progress(urls: Sequence[str], keys: SampleKeys, options: ReadOptions | None, what: str,
                        progress: bool = True, sha256: bool = False) -> SpecIndex:
    """build_index with a progress bar (shards and samples so far) on stderr."""
    from pipeline.tracking.console import progress_bar

    samples = 0
    with progress_bar(progress) as bar:
        task = bar.add_task(f"indexing {what}", total=len(urls))

        def done(entry: ShardEntry) -> None:
            nonlocal samples
            samples += entry.num_samples
            bar.update(task, advance=1, info=f"{samples} samples")

        index = build_index(urls, keys, options, sha256=sha256, on_shard=done)
    return index


def label_summary(counts: Counter) -> str:
    """'10 labels: 0..9' or '3 names: cat, dog, ...' for messages."""
    ints = sorted(k for k in counts if isinstance(k, int))
    names = sorted(k for k in counts if isinstance(k, str))
    parts = []
    if ints:
        parts.append(f"{len(ints)} integer label(s) {ints[0]}..{ints[-1]}")
    if names:
        parts.append(f"{len(names)} name(s) {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    return "; ".join(parts) or "no labels"
