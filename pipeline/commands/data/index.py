"""`pipeline data index`: index shard specs afresh (into the cache, and a file if asked) and print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.data.balance import shard_mixing
from pipeline.data.dataset.index import SpecIndex, cache_path, index_with_progress, label_summary


def write_index(specs: Sequence[str], data, out: str | None = None, sha256: bool = False,
                progress: bool = True, split: str = "train") -> tuple[SpecIndex, Path]:
    """`pipeline data index`: index the shards `specs` name afresh, into the cache (and `out`); `split`: which split
    of one of our folders a spec names (the training shards' SPEC, --val's, --test's)."""
    from pipeline.data.dataset.resolve import read_options, sample_keys
    from pipeline.data.dataset.specs import expand

    what = "SPEC" if split == "train" else f"--{split}"
    expanded = expand(list(specs), what, split)
    keys = sample_keys(data)
    index = index_with_progress(expanded.urls, keys, read_options(data), f"{what} shards", progress, sha256)
    path = cache_path(data.index_dir, expanded.urls, keys)
    index.write(path)
    if out:
        index.write(Path(out))
        path = Path(out)
    return index, path


def print_index(index: SpecIndex, path: Path) -> None:
    """One row per shard (samples, size, labels), the totals, and where the index was written."""
    from rich.markup import escape
    from rich.table import Table

    from pipeline.data.dataset.specs import several_splits_line
    from pipeline.tracking.console import console, warn

    table = Table(title_justify="left")
    for name, kwargs in (("shard", {"no_wrap": True}), ("samples", {"justify": "right"}),
                         ("MB", {"justify": "right"}), ("no label", {"justify": "right"}), ("problem", {})):
        table.add_column(name, **kwargs)
    for shard in index.shards:
        table.add_row(escape(shard.url), str(shard.num_samples), f"{shard.num_bytes / 1e6:.1f}",
                      str(shard.no_label or ""), escape(shard.error), style="red" if shard.error else "")
    console.print(table)
    counts = index.label_counts()
    no_label = sum(s.no_label for s in index.shards)
    console.print(escape(f"{len(index.shards)} shard(s), {index.num_samples} samples; labels under "
                         f"'{index.label_key}': {label_summary(counts)}"
                         f"{f'; {no_label} without a label' if no_label else ''}; index: {path}"))
    several = several_splits_line([shard.url for shard in index.shards])
    if several:
        warn(several)
    mixing = shard_mixing([shard.raw_labels() for shard in index.shards])
    if mixing is not None:
        advice = "; training mixes data.mix_shards shards per worker" if mixing.class_sorted else ""
        console.print(escape(f"classes across shards: {mixing.describe()}{advice}"))


def index_splits(specs: Sequence[str], others: dict[str, Sequence[str]], data, out: str | None = None,
                 sha256: bool = False, progress: bool = True) -> int:
    """`pipeline data index SPEC [--val SPEC] [--test SPEC]`: index each afresh, print its table, and warn when val
    or test samples are training (SPEC) samples too; 1 when a shard could not be read to its end, else 0."""
    from pipeline.data.dataset.resolve import warn_shared_samples

    indexes = {}
    for split, split_specs in {"train": specs, **others}.items():
        if split_specs:
            index, path = write_index(split_specs, data, out if split == "train" else None, sha256, progress, split)
            print_index(index, path)
            indexes[split] = index
    warn_shared_samples(indexes, names={"train": "the SPEC shards", "val": "--val", "test": "--test"})
    return 0 if not any(s.error for index in indexes.values() for s in index.shards) else 1
