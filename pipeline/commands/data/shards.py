"""`pipeline data shards SRC OUT`: what was written, in a few lines (the writer itself is core: data/shards.py)."""

from __future__ import annotations

from pipeline.data.manifest import Manifest


def print_written(manifest: Manifest, out: str) -> None:
    """Which split folders were kept or carved, the samples and shards per split, what was skipped, the balance."""
    from pipeline.data.balance import imbalance_summary  # (it loads torch: not before a bad SRC is refused)

    if manifest.split_source == "folders":
        kept = ", ".join(f"{split} <- {folder}/" for split, folder in manifest.split_folders.items())
        carved = "".join(f"; {split} carved from train ({share:.0%}, stratified)"
                         for split, share in manifest.carved_from_train.items())
        print(f"kept the source's split folders: {kept}{carved}")
    for name, info in manifest.splits.items():
        print(f"{name:5s}: {info.num_samples:7d} samples in {len(info.shards)} shard(s)")
    for line in manifest.skipped_sources:
        print(f"skipped (cannot be decoded): {line}")
    print(f"{manifest.num_classes} classes; manifest: {out}/manifest.json")
    print("\n".join(imbalance_summary(manifest)))


__all__ = ["print_written"]
