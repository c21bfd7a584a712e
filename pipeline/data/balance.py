"""Class imbalance: loss weights from the manifest's counts, a class-balanced shard stream, a summary; and how the
classes lie across the training shards (class-sorted or mixed)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

from pipeline.data.dataset.manifest import Manifest
from pipeline.data.plan import Segment
from pipeline.data.samples.faults import MISSING, UNDRAWN, parse_label
from pipeline.data.stream import ShardStream


def class_counts(manifest: Manifest, split: str = "train") -> list[int]:
    """Samples per class (in class-index order) of a split."""
    counts = manifest.split(split).class_counts
    return [int(counts.get(name, 0)) for name in manifest.classes]


def auto_class_weights(counts: list[int]) -> list[float]:
    """n / (classes x count_c): 1 for every class when balanced; a class with no samples gets 0."""
    total, k = sum(counts), len(counts)
    return [total / (k * c) if c else 0.0 for c in counts]


def imbalance_summary(manifest: Manifest) -> list[str]:
    """Per split: total, smallest and largest class, their ratio; lines to print."""
    lines = []
    for split, info in manifest.splits.items():
        counts = class_counts(manifest, split)
        if not info.num_samples:
            continue
        low, high = min(counts), max(counts)
        lo_name, hi_name = manifest.classes[counts.index(low)], manifest.classes[counts.index(high)]
        ratio = f"{high / low:.2f}" if low else "inf"
        if low == high:
            lines.append(f"{split:5s}: {info.num_samples} samples, {manifest.num_classes} classes; {low} per class "
                         "(balanced)")
            continue
        lines.append(f"{split:5s}: {info.num_samples} samples, {manifest.num_classes} classes; smallest "
                     f"'{lo_name}' {low}, largest '{hi_name}' {high}, imbalance ratio {ratio}")
    return lines


BALANCED_DRAW = 0xBA1A
"""Mixed into the seed of the balanced draw (an int: a str's hash differs between processes, which made the
draw differ between a run and its resumption, and between workers started apart)."""


class BalancedShardStream(ShardStream):
    """A training stream that draws each shard slice's samples with replacement, weighted 1/count(class).

    The slice keeps its length, so steps per epoch, the rank/worker layout and exact resume (which
    counts samples per slice) are unchanged; the draw is seeded like the shuffle buffer. A class
    absent from a slice cannot be drawn from it, so shards should mix classes (ours do). Samples
    without a usable label, or missing from a truncated shard, are never drawn; they ride along
    with the slice's first drawn sample (`faults.UNDRAWN`), so they are still counted and warned
    about. Undecodable images are drawn, then replaced and counted as in ShardStream.
    """

    elastic = False
    """A slice's draw depends on the slot, so what an interrupted epoch left unread is not a set of samples."""

    def __init__(self, *args, class_counts: list[int], **kwargs):
        # One lane per slot: the draw is per slice, and lanes cut slices so short (a 16th) that a class absent
        # from one could not be drawn there; resampling with replacement is its own remedy for sorted shards.
        super().__init__(*args, **{**kwargs, "mix_shards": 1})
        self.class_weight = [1.0 / c if c else 0.0 for c in class_counts]

    def _segment_samples(self, epoch: int, slot: int, number: int, segment: Segment, skip: int) -> Iterator[dict]:
        samples = list(super()._segment_samples(epoch, slot, number, segment, 0))
        rng = random.Random(hash((self.seed, epoch, slot, number, segment.shard, BALANCED_DRAW)))
        weights = [self._weight(s) for s in samples]
        # A slice with nothing drawable (all labels bad, shard truncated) yields its samples as they
        # are: the stream replaces and counts them, and the slice keeps its length.
        if sum(weights) == 0:
            yield from samples[skip:]
            return
        drawn = rng.choices(samples, weights=weights, k=len(samples))
        # Samples that can never be drawn still get counted (and warned about), at the slice's first position.
        undrawable = [s for s in samples if self._is_bad(s)]
        if undrawable:
            drawn[0] = {**drawn[0], UNDRAWN: undrawable}
        yield from drawn[skip:]

    def _is_bad(self, sample: dict) -> bool:
        return MISSING in sample or bool(parse_label(sample, len(self.class_weight), self.keys)[1])

    def _weight(self, sample: dict) -> float:
        """Draw weight of a raw sample: 1/count of its class; 0 for one without a usable label."""
        label, reason, _ = parse_label(sample, len(self.class_weight), self.keys)
        return 0.0 if reason or MISSING in sample else self.class_weight[label]


SORTED_BELOW = 0.5
"""Shards whose mean class entropy is below this share of the dataset's are called class-sorted (or nearly so): a
shard then holds about the square root of the dataset's (effective) number of classes, or fewer."""


def class_entropy(counts: Mapping[object, int]) -> float:
    """Shannon entropy (bits) of a label distribution given as label -> samples."""
    total = sum(counts.values())
    return -sum(n / total * math.log2(n / total) for n in counts.values() if n) if total else 0.0


@dataclass(frozen=True)
class ShardMixing:
    """How mixed the classes of a split's shards are: the samples-weighted mean of the per-shard class entropy
    against the entropy of the whole split. Ratio 1: every shard holds the split's class mix (shuffled shards);
    0: every shard holds one class (a ShardWriter loop over an ImageFolder)."""

    shard_entropy: float
    dataset_entropy: float
    num_shards: int

    @property
    def ratio(self) -> float:
        return self.shard_entropy / self.dataset_entropy if self.dataset_entropy > 0 else 1.0

    @property
    def class_sorted(self) -> bool:
        return self.ratio < SORTED_BELOW

    def describe(self) -> str:
        verdict = "class-sorted or nearly so" if self.class_sorted else "mixed"
        return (f"per-shard class entropy {self.shard_entropy:.2f} bits on average, {self.ratio:.0%} of the "
                f"{self.dataset_entropy:.2f} bits of all {self.num_shards} shards together: {verdict}")


def shard_mixing(per_shard: Sequence[Mapping[object, int]]) -> Optional[ShardMixing]:
    """The mixing measure of shards given as label -> samples each; None without labelled samples."""
    total: dict = {}
    for counts in per_shard:
        for label, n in counts.items():
            total[label] = total.get(label, 0) + n
    samples = sum(total.values())
    if not samples:
        return None
    mean = sum(sum(c.values()) * class_entropy(c) for c in per_shard) / samples
    return ShardMixing(mean, class_entropy(total), len(per_shard))


def mixing_line(mixing: Optional[ShardMixing], mix_shards: int, batch_size: int) -> str:
    """The line a run prints at start when its training shards are class-sorted ('' when they are not)."""
    if mixing is None or not mixing.class_sorted:
        return ""
    if mix_shards > 1:
        remedy = (f"each loader worker reads {mix_shards} places of the epoch at once and takes their samples in "
                  f"turn (data.mix_shards={mix_shards}), so a batch of {batch_size} draws from {mix_shards} of them")
    else:
        remedy = "data.mix_shards=1 reads one shard after another, so a batch holds one or two classes; raise it"
    return f"training shards: {mixing.describe()}; {remedy}"
