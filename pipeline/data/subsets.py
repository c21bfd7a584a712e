"""Write chosen samples per split as shards + manifest (for few-shot subsets and cross-validation folds)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.data.manifest import Manifest, SplitInfo
from pipeline.data.shards import _RollingTarWriter


def write_split_shards(out: str | Path, classes: list[str], splits: dict[str, list[tuple[dict[str, bytes], int]]],
                       source: str, max_samples: int = 64) -> Manifest:
    """`splits[name]` is a list of ({extension: image bytes}, label); written to a staging folder, then renamed."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    infos = {}
    for split, samples in splits.items():
        writer = _RollingTarWriter(staging, split, max_samples, 1 << 30)
        counts = {name: 0 for name in classes}
        for position, (payload, label) in enumerate(samples):
            writer.write({"__key__": f"{position:08d}", **payload, "cls": str(label).encode()})
            counts[classes[label]] += 1
        writer.close()
        infos[split] = SplitInfo(num_samples=len(samples), class_counts=counts, shards=writer.shards)
    manifest = Manifest(classes=list(classes), splits=infos, source=source)
    manifest.write(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return manifest
