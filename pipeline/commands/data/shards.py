"""`pipeline data shards SRC OUT`: what was written, in a few lines (the writer itself is core: data/shards.py)."""

from __future__ import annotations

from pipeline.data.dataset.manifest import Manifest

SPLIT_METHODS = {"stratified": "stratified by class", "iterative": "iterative stratification of the label sets",
                 "binned": "stratified by quantile bins of {first}"}
"""The manifest's split_source (a seeded split of all images) as the summary says it."""


def print_written(manifest: Manifest, out: str) -> None:
    """How the splits were made, the samples and shards per split, what was skipped, the balance (regression: the
    targets' mean and std), and the task.type / data.label_key to train with."""
    if manifest.split_source == "folders":
        kept = ", ".join(f"{split} <- {folder}/" for split, folder in manifest.split_folders.items())
        carved = "".join(f"; {split} carved from train ({share:.0%}, stratified)"
                         for split, share in manifest.carved_from_train.items())
        print(f"kept the source's split folders: {kept}{carved}")
    elif manifest.split_source in SPLIT_METHODS:
        method = SPLIT_METHODS[manifest.split_source].format(first=f"'{manifest.classes[0]}'")
        print(f"split {', '.join(f'{f:g}' for f in manifest.split_fractions)}: {method} (seed {manifest.seed})")
    for name, info in manifest.splits.items():
        print(f"{name:5s}: {info.num_samples:7d} samples in {len(info.shards)} shard(s)")
    for line in manifest.skipped_sources:
        print(f"skipped (cannot be decoded): {line}")
    what = "output(s)" if manifest.task == "regression" else "classes"
    print(f"{manifest.num_classes} {what}; manifest: {out}/manifest.json")
    print("\n".join(_balance_lines(manifest)))
    print(f"train with: pipeline train CONFIG data.root={out}" + ("" if manifest.task == "classification" else
          f" task.type={manifest.task} data.label_key={manifest.label_key}"))


def _balance_lines(manifest: Manifest) -> list[str]:
    """Per split: the class balance (multilabel: positives per class), or regression's mean ± std per output."""
    from pipeline.data.balance import imbalance_summary  # (it loads torch: not before a bad SRC is refused)

    if manifest.task != "regression":
        return imbalance_summary(manifest)
    return [f"{split:5s}: " + ", ".join(f"{name} {mean:.4g} ± {std:.4g}" for name, mean, std in
                                        zip(manifest.classes, info.targets["mean"], info.targets["std"]))
            for split, info in manifest.splits.items() if info.targets]


__all__ = ["print_written"]
