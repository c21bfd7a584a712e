"""Write chosen samples per split as shards + manifest (for few-shot subsets and cross-validation folds)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.data.dataset.keys import TargetLabel
from pipeline.data.dataset.manifest import Manifest
from pipeline.data.writer.shards import RollingTarWriter, label_member, split_info


def write_split_shards(out: str | Path, classes: list[str],
                       splits: dict[str, list[tuple[dict[str, bytes], TargetLabel]]], source: str,
                       max_samples: int = 64, task: str = "classification", label_key: str = "cls",
                       split_source: str = "stratified") -> Manifest:
    """`splits[name]` is a list of ({member: bytes}, label); written to a staging folder, then renamed.

    classification: the members are the image's, and the label (a class index) is written as `cls`. Other tasks:
    the members hold the label already (read with `label_key`, recorded in the manifest), and the label
    (`SampleKeys.label`'s form) only counts (`split_info`). `split_source`: how the samples were chosen (the
    manifest's field: cross-validation folds say by what they were stratified)."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    infos = {}
    for split, samples in splits.items():
        writer = RollingTarWriter(staging, split, max_samples, 1 << 30)
        for position, (payload, label) in enumerate(samples):
            member = label_member(label, classes, task) if task == "classification" else {}  # else: in payload
            writer.write({"__key__": f"{position:08d}", **payload, **member})
        writer.close()
        infos[split] = split_info([label for _, label in samples], classes, task, writer.shards)
    manifest = Manifest(classes=list(classes), splits=infos, source=source, task=task, label_key=label_key,
                        split_source=split_source)
    manifest.write(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)
    return manifest
