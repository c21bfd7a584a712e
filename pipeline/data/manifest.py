"""The shard folder's manifest.json: classes, per-split counts, shard names, sizes and sha256."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass
class ShardInfo:
    """One tar shard of a split."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str


@dataclass
class SplitInfo:
    """One split: its shards in write order and its class counts."""

    num_samples: int
    class_counts: dict[str, int]
    shards: list[ShardInfo] = field(default_factory=list)


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
    """'folders': the source's own split folders were kept (see split_folders); 'stratified': one seeded
    stratified split of all images by split_fractions."""
    split_folders: dict[str, str] = field(default_factory=dict)
    """split -> the source folder it was read from (split_source 'folders')."""
    carved_from_train: dict[str, float] = field(default_factory=dict)
    """Splits with no folder, carved from the train folder (stratified, seeded): split -> share of train."""
    duplicate_sources: list[dict] = field(default_factory=list)
    """Groups of byte-identical source files under different paths: {sha256, files: [{path, class, split}]}."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        data = asdict(self)
        data["num_classes"] = self.num_classes
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in '{folder}'; build shards with "
                                    f"`pipeline data shards SRC {folder}`")
        try:
            data = json.loads(path.read_text())
            splits = {
                name: SplitInfo(num_samples=s["num_samples"], class_counts=s["class_counts"],
                                shards=[ShardInfo(**sh) for sh in s["shards"]])
                for name, s in data["splits"].items()
            }
            return cls(classes=list(data["classes"]), splits=splits, source=data.get("source", ""),
                       seed=data.get("seed", 0), split_fractions=data.get("split_fractions", []),
                       version=data.get("version", 1), image_mode=data.get("image_mode", ""),
                       image_size=data.get("image_size"), skipped_sources=data.get("skipped_sources", []),
                       split_source=data.get("split_source", "stratified"),
                       split_folders=data.get("split_folders", {}),
                       carved_from_train=data.get("carved_from_train", {}),
                       duplicate_sources=data.get("duplicate_sources", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"'{path}' is not a valid manifest ({type(exc).__name__}: {exc})") from None

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in manifest; it has {', '.join(self.splits)}")
        return self.splits[name]
