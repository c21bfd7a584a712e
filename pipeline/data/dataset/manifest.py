"""The shard folder's manifest.json: classes, per-split counts, shard names, sizes and sha256.

Beside it, sample_offsets.json (written with it when the writer recorded them) holds each sample's byte offset per
shard, so a reader can open a shard at any sample (a seek; see `pipeline.data.io.tar.placed_samples`). It is kept out
of manifest.json (8 bytes a sample, not for reading) and used for a shard only while that shard's file still has the
size both files recorded; otherwise the reader walks the shard from its start, as for a folder written without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

from pipeline.config.schema import TASK_TYPES

MANIFEST_NAME = "manifest.json"
OFFSETS_NAME = "sample_offsets.json"
SPLITS = ("train", "val", "test")


@dataclass
class ShardInfo:
    """One tar shard of a split."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    version: str = ""
    """What the shard looked like when indexed (foreign shards: size and mtime, or ETag); '' for our own."""
    offsets: list[int] = field(default_factory=list, repr=False)
    """Each sample's byte offset in the shard, where the reader may open it: from the shard index
    (`ShardEntry.trusted_offsets`) or, for our own shards, from the writer (sample_offsets.json). Empty where
    unknown (then a reader walks from the shard's start); never written into manifest.json."""


@dataclass
class SplitInfo:
    """One split: its shards in write order and its class counts."""

    num_samples: int
    class_counts: dict[str, int]
    shards: list[ShardInfo] = field(default_factory=list)
    targets: dict = field(default_factory=dict)
    """task.type=regression: {count, mean, std} of the labels, one value per output (standardises the targets)."""


@dataclass
class SharedSamples:
    """Samples of one split whose image is byte-identical to a training sample's: found by the fingerprints of a
    shard index (`pipeline.data.dataset.index.shared_samples`) or by our manifest's `duplicate_sources`."""

    split: str
    count: int
    """Samples of `split` whose fingerprint a training sample has."""
    total: int
    """Samples of `split` in all."""
    examples: list[tuple[str, str]]
    """(key in `split`, key of the training sample; source paths for our shards): the first three."""

    def line(self, what: str, train_what: str) -> str:
        """The warning: 'data.val: 100 of 200 samples are also in data.train (the same image bytes), e.g. ...'."""
        shown = ", ".join(f"'{key}'" + (f" (train: '{train_key}')" if train_key != key else "")
                          for key, train_key in self.examples)
        return (f"{what}: {self.count} of {self.total} samples are also in {train_what} (the same image bytes), "
                f"e.g. {shown}; {self.split} metrics on them measure memory, not generalisation")


@dataclass
class Manifest:
    """Everything a loader needs to know about a shard folder without opening a tar."""

    classes: list[str]
    splits: dict[str, SplitInfo]
    source: str = ""
    seed: int = 0
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    version: int = 1
    image_mode: str = ""
    """The most common PIL mode of the written images (e.g. RGB); others are converted on load and
    counted. Empty in manifests written before it was recorded: then nothing is counted."""
    image_size: Optional[list[int]] = None
    """[width, height] when every written image has that size; a sample of another size is resized
    by the transforms like any other, and counted as converted. None: sizes vary (or unknown)."""
    skipped_sources: list[str] = field(default_factory=list)
    """Source images the writer could not decode and left out (`--skip-bad`): 'path: reason'."""
    split_source: str = "stratified"
    """How the splits were made: 'folders': the source's own split folders were kept (see split_folders); else one
    seeded split of all images by split_fractions, 'stratified' by class, 'iterative' (task multilabel: iterative
    stratification of the label sets) or 'binned' (task regression: stratified by quantile bins of the first
    output); 'specs': shards named by data.train/val/test (see `pipeline.data.writer.stratify`)."""
    split_folders: dict[str, str] = field(default_factory=dict)
    """split -> the source folder it was read from (split_source 'folders')."""
    carved_from_train: dict[str, float] = field(default_factory=dict)
    """Splits with no folder, carved from the train folder (stratified, seeded): split -> share of train."""
    duplicate_sources: list[dict] = field(default_factory=list)
    """Groups of byte-identical source files under different paths: {sha256, files: [{path, class, split}]}."""
    task: str = "classification"
    """What a sample's label is (the task.type to train with): classification, multilabel (class_counts count the
    positives per class) or regression (classes are the outputs; class_counts the labelled samples per output, and
    each split's `targets` their statistics). Manifests written before it was recorded are classification."""
    label_key: str = "cls"
    """The data.label_key the shards are read with: cls, or json.labels (multilabel) / json.target (regression)
    from `pipeline data shards`; a fold's shards keep their source's."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shared_with_train(self) -> list[SharedSamples]:
        """Val and test samples whose source file is byte-identical to a training sample's (`duplicate_sources`:
        the writer hashed every source file, so this costs nothing here)."""
        found = []
        for split in ("val", "test"):
            count, examples = 0, []
            for group in self.duplicate_sources:
                files = group.get("files", []) if isinstance(group, dict) else []
                train = [f.get("path", "") for f in files if isinstance(f, dict) and f.get("split") == "train"]
                here = [f.get("path", "") for f in files if isinstance(f, dict) and f.get("split") == split]
                if train and here:
                    count += len(here)
                    examples += [(str(path), str(train[0])) for path in here[:3 - len(examples)]]
            if count and split in self.splits:
                found.append(SharedSamples(split, count, self.splits[split].num_samples, examples))
        return found

    def write(self, folder: str | Path) -> Path:
        """Write manifest.json into `folder`, and the shards' sample offsets, where every shard has them, into
        sample_offsets.json beside it (module docstring; an older one is removed otherwise)."""
        path = Path(folder) / MANIFEST_NAME
        data = asdict(self)
        offsets = {}
        for split in data["splits"].values():
            for shard in split["shards"]:
                offsets[shard["name"]] = {"num_bytes": shard["num_bytes"], "offsets": shard.pop("offsets")}
        data["num_classes"] = self.num_classes
        path.write_text(json.dumps(data, indent=2) + "\n")
        sidecar = Path(folder) / OFFSETS_NAME
        if offsets and all(len(o["offsets"]) for o in offsets.values()):
            sidecar.write_text(json.dumps({"version": 1, "shards": offsets}, separators=(",", ":")) + "\n")
        else:
            sidecar.unlink(missing_ok=True)
        return path

    @classmethod
    def read(cls, folder: str | Path, offsets: bool = False) -> "Manifest":
        """The checked manifest of `folder`; `offsets`: also each shard's sample offsets from sample_offsets.json where
        they still hold (what a loader opens shards at; 8 bytes a sample, so only readers that build loaders ask)."""
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in '{folder}'; build shards with "
                                    f"`pipeline data shards SRC {folder}`")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: not a JSON file ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object (it holds a {type(data).__name__})")
        manifest = _ManifestChecker(path, Path(folder)).manifest(data)
        if offsets:
            _attach_offsets(Path(folder), manifest)
        return manifest

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in manifest; it has {', '.join(self.splits)}")
        return self.splits[name]


def _attach_offsets(folder: Path, manifest: Manifest) -> None:
    """Give each shard its sample offsets from sample_offsets.json where they still hold: the shard's file has the
    size both files recorded, and the offsets are one ascending list of a shard's sample count inside it."""
    try:
        recorded = json.loads((folder / OFFSETS_NAME).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):  # none, or unreadable: the reader walks (only slower)
        return
    for split in manifest.splits.values():
        for shard in split.shards:
            entry = recorded.get(shard.name) if isinstance(recorded, dict) else None
            if isinstance(entry, dict) and _offsets_hold(folder / shard.name, shard, entry):
                shard.offsets = entry["offsets"]


def _offsets_hold(path: Path, shard: ShardInfo, entry: dict) -> bool:
    offsets, size = entry.get("offsets"), entry.get("num_bytes")
    if not isinstance(offsets, list) or len(offsets) != shard.num_samples or size != shard.num_bytes:
        return False
    try:
        if path.stat().st_size != size:
            return False
    except OSError:
        return False
    return (all(type(o) is int for o in offsets) and offsets[:1] == [0]
            and all(a < b for a, b in zip(offsets, offsets[1:])) and offsets[-1] < size)


def _show(value: Any) -> str:
    """A value for an error line: its repr, on one line, at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _ManifestChecker:
    """Checks a parsed manifest field by field before anything uses it; each problem is one ValueError line
    naming the field (`splits.train.shards[1].name=...`). Unknown fields are ignored (forward compatible)."""

    def __init__(self, path: Path, root: Path):
        self.path, self.root = path, root.resolve()

    def fail(self, where: str, value: Any, why: str) -> NoReturn:
        raise ValueError(f"{self.path}: {where}={_show(value)} {why}")

    def get(self, data: dict, key: str, where: str, default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise ValueError(f"{self.path}: {where}{key} is missing")
            return default
        return data[key]

    def count(self, value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.fail(where, value, "must be a non-negative integer")
        return value

    def typed(self, value: Any, kind: type | tuple, where: str, what: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                    else (kind,)):
            self.fail(where, value, f"must be {what}")
        return value

    def strings(self, value: Any, where: str) -> list[str]:
        self.typed(value, list, where, "a list of strings")
        for i, item in enumerate(value):
            self.typed(item, str, f"{where}[{i}]", "a string")
        return list(value)

    def classes(self, data: dict) -> list[str]:
        classes = self.strings(self.get(data, "classes", ""), "classes")
        for i, name in enumerate(classes):
            if not name or name in classes[:i]:
                self.fail(f"classes[{i}]", name, "must be a non-empty name that appears once")
        if "num_classes" in data and self.count(data["num_classes"], "num_classes") != len(classes):
            self.fail("num_classes", data["num_classes"], f"disagrees with classes, which lists {len(classes)}")
        return classes

    def shard_name(self, value: Any, where: str) -> str:
        self.typed(value, str, where, "a file name relative to the data folder")
        if not value or "\x00" in value or Path(value).is_absolute() or ".." in Path(value).parts:
            self.fail(where, value, "leaves the data folder (give a relative name without '..')")
        resolved = (self.root / value).resolve()
        if resolved == self.root or not resolved.is_relative_to(self.root):
            self.fail(where, value, f"leaves the data folder '{self.root}' (it resolves to '{resolved}')")
        return value

    def shard(self, value: Any, where: str) -> ShardInfo:
        self.typed(value, dict, where, "an object with name, num_samples, num_bytes, sha256")
        return ShardInfo(name=self.shard_name(self.get(value, "name", f"{where}."), f"{where}.name"),
                         num_samples=self.count(self.get(value, "num_samples", f"{where}."), f"{where}.num_samples"),
                         num_bytes=self.count(self.get(value, "num_bytes", f"{where}.", 0), f"{where}.num_bytes"),
                         sha256=self.typed(self.get(value, "sha256", f"{where}.", ""), str, f"{where}.sha256",
                                           "a hex string"))

    def split(self, value: Any, where: str, classes: list[str], task: str) -> SplitInfo:
        self.typed(value, dict, where, "an object with num_samples, class_counts, shards")
        total = self.count(self.get(value, "num_samples", f"{where}."), f"{where}.num_samples")
        counts = self.typed(self.get(value, "class_counts", f"{where}."), dict, f"{where}.class_counts",
                            "an object of class name -> count")
        for name, n in counts.items():
            if name not in classes:
                self.fail(f"{where}.class_counts", name, "is not one of classes")
            if self.count(n, f"{where}.class_counts[{name!r}]") > total:  # a sample counts once per class at most
                self.fail(f"{where}.class_counts[{name!r}]", n, f"is more than num_samples={total}")
        if task == "classification" and sum(counts.values()) != total:
            self.fail(f"{where}.class_counts", counts, f"adds up to {sum(counts.values())}, not num_samples={total}")
        listed = self.typed(self.get(value, "shards", f"{where}."), list, f"{where}.shards", "a list of shards")
        shards = [self.shard(sh, f"{where}.shards[{i}]") for i, sh in enumerate(listed)]
        if sum(s.num_samples for s in shards) != total:
            self.fail(f"{where}.shards", len(shards), f"shard(s) hold {sum(s.num_samples for s in shards)} "
                      f"samples, not num_samples={total}")
        return SplitInfo(num_samples=total, class_counts=dict(counts), shards=shards,
                         targets=self.targets(self.get(value, "targets", f"{where}.", {}), f"{where}.targets",
                                              len(classes)))

    def targets(self, value: Any, where: str, outputs: int) -> dict:
        """{} or {count, mean, std} with a number per output (regression's statistics)."""
        self.typed(value, dict, where, "an object {count, mean, std}")
        if not value:
            return {}
        self.count(self.get(value, "count", f"{where}."), f"{where}.count")
        for key in ("mean", "std"):
            numbers = self.typed(self.get(value, key, f"{where}."), list, f"{where}.{key}", "a list of numbers")
            if len(numbers) != outputs:
                self.fail(f"{where}.{key}", numbers, f"must hold one number per output ({outputs})")
            for i, number in enumerate(numbers):
                self.typed(number, (int, float), f"{where}.{key}[{i}]", "a number")
        return dict(value)

    def splits(self, data: dict, classes: list[str], task: str) -> dict[str, SplitInfo]:
        raw = self.typed(self.get(data, "splits", ""), dict, "splits", "an object of split name -> split")
        splits = {name: self.split(s, f"splits.{name}" if name.isidentifier() else f"splits[{name!r}]", classes,
                                   task) for name, s in raw.items()}
        names = [s.name for info in splits.values() for s in info.shards]
        for name in names:
            if names.count(name) > 1:
                self.fail("splits", name, "lists this shard more than once")
        return splits

    def manifest(self, data: dict) -> Manifest:
        classes = self.classes(data)
        task = self.typed(self.get(data, "task", "", "classification"), str, "task", "a string")
        if task not in TASK_TYPES:
            self.fail("task", task, f"must be one of {', '.join(TASK_TYPES)}")
        size = self.get(data, "image_size", "", None)
        if size is not None and (not isinstance(size, list) or len(size) != 2
                                 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in size)):
            self.fail("image_size", size, "must be null or [width, height] in positive integers")
        fractions = self.typed(self.get(data, "split_fractions", "", []), list, "split_fractions", "a list of numbers")
        for i, f in enumerate(fractions):
            self.typed(f, (int, float), f"split_fractions[{i}]", "a number")
        return Manifest(classes=classes, splits=self.splits(data, classes, task), task=task,
                        label_key=self.typed(self.get(data, "label_key", "", "cls"), str, "label_key", "a string"),
                        source=self.typed(self.get(data, "source", "", ""), str, "source", "a string"),
                        seed=self.typed(self.get(data, "seed", "", 0), int, "seed", "an integer"),
                        split_fractions=list(fractions),
                        version=self.typed(self.get(data, "version", "", 1), int, "version", "an integer"),
                        image_mode=self.typed(self.get(data, "image_mode", "", ""), str, "image_mode", "a PIL mode"),
                        image_size=size, skipped_sources=self.strings(self.get(data, "skipped_sources", "", []),
                                                                      "skipped_sources"),
                        **self.provenance(data))

    def provenance(self, data: dict) -> dict:
        """Where the split came from (written by `pipeline data shards`; informational, never read as paths)."""
        source = self.typed(self.get(data, "split_source", "", "stratified"), str, "split_source", "a string")
        folders = self.typed(self.get(data, "split_folders", "", {}), dict, "split_folders",
                             "an object of split -> folder name")
        for key, value in folders.items():
            self.typed(value, str, f"split_folders[{key!r}]", "a folder name")
        carved = self.typed(self.get(data, "carved_from_train", "", {}), dict, "carved_from_train",
                            "an object of split -> share of train")
        for key, value in carved.items():
            self.typed(value, (int, float), f"carved_from_train[{key!r}]", "a number")
        duplicates = self.typed(self.get(data, "duplicate_sources", "", []), list, "duplicate_sources",
                                "a list of groups")
        return {"split_source": source, "split_folders": dict(folders), "carved_from_train": dict(carved),
                "duplicate_sources": list(duplicates)}
