"""What the data package's inner walls share: one rule for replacing a bad sample, one owner of the bad-sample
counts, and read options taken from the `data:` config by name."""

from __future__ import annotations

from dataclasses import fields

import torch

from pipeline.config.schema import DataConfig, ReadConfig
from pipeline.data.dataset.resolve import read_options
from pipeline.data.io.handles import ReadOptions
from pipeline.data.samples.faults import FIELDS, BadSampleCounts, replace_bad


def fills(flags: list[bool], first: int) -> list[int]:
    return [fill for _, fill in replace_bad(range(len(flags)), lambda i: flags[i], lambda: first)]


def test_a_bad_item_takes_the_next_good_one_else_the_first_good_one() -> None:
    assert fills([True, False, False, True, False], first=0) == [0, 3, 3, 3, 0]
    assert fills([False, True, True], first=1) == [1, 1, 2]
    assert fills([True, True], first=0) == [0, 1]


def test_first_good_is_asked_only_when_bad_items_end_the_sequence() -> None:
    asked = []
    pairs = list(replace_bad("abc", lambda item: True, lambda: asked.append(1)))
    assert pairs == [("a", "a"), ("b", "b"), ("c", "c")] and not asked


def test_bad_sample_counts_add_zero_and_round_trip_through_a_state_dict() -> None:
    counts = BadSampleCounts()
    batch = torch.arange(len(FIELDS), dtype=torch.int64)
    counts.add(batch)
    counts.add(batch)
    state = counts.state_dict()
    assert torch.equal(state["counts"], 2 * batch)
    counts.zero()
    assert not counts.total.any() and torch.equal(state["counts"], 2 * batch)  # the state is a copy
    restored = BadSampleCounts()
    restored.load_state_dict(state)
    assert torch.equal(restored.total, 2 * batch)


def test_read_options_take_every_field_the_data_config_shares_with_them() -> None:
    shared = [f.name for f in fields(ReadOptions) if f.name in {g.name for g in fields(DataConfig)}]
    assert shared == [f.name for f in fields(ReadConfig)] and len(shared) == 9  # defined once, in ReadConfig
    defaults, options = DataConfig(), ReadOptions()
    assert all(getattr(defaults, name) == getattr(options, name) for name in shared)
    data = DataConfig(retries=2, timeout_s=7.0, cache_dir="/c", cache_max_gb=3.0, endpoint_url="http://e",
                      prefetch_mb=4.0, min_bytes_per_s=5.0, slow_window_s=6.0, max_sample_mb=8.0)
    built = read_options(data)
    assert [getattr(built, name) for name in shared] == [getattr(data, name) for name in shared]
    assert built.pinned == {} and built.backoff_s == ReadOptions().backoff_s
