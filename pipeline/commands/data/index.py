"""`pipeline data index`: index shard specs afresh (into the cache, and a file if asked) and print the table."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.data.balance import shard_mixing
from pipeline.data.index import SpecIndex, cache_path, index_with_progress, label_summary


def write_index(specs: Sequence[str], data, out: str | None = None, sha256: bool = False,
                progress: bool = True) -> tuple[SpecIndex, Path]:
    """`pipeline data index`: index the shards `specs` name afresh, into the cache (and `out`)."""
    from pipeline.data.dataset import read_options, sample_keys
    from pipeline.data.specs import expand

    expanded = expand(list(specs), "SPEC", "train")
    keys = sample_keys(data)
    index = index_with_progress(expanded.urls, keys, read_options(data), "shards", progress, sha256)
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

    from pipeline.data.specs import several_splits_line
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
