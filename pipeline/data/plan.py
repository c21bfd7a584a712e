"""The epoch plan: which shard slices each slot and lane reads in an epoch, in which order, and what an earlier
layout of the same epoch left unread (rules 1-3 and 6 of `pipeline.data.stream`'s docstring). Pure arithmetic on
shard sizes and seeds: no shard is opened here, so a plan can be made and checked anywhere."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Segment:
    """A slice [start, stop) of one shard's samples; with `keep`, only those shard indices of it (ascending)."""

    shard: int
    start: int
    stop: int
    keep: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @property
    def length(self) -> int:
        return self.stop - self.start if self.keep is None else len(self.keep)

    def indices(self) -> np.ndarray:
        """The shard indices it reads, in reading order (before the shuffle buffer)."""
        return np.arange(self.start, self.stop) if self.keep is None else self.keep


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order in which an epoch visits the shards; a pure function of (seed, epoch)."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)]


def slot_segments(shard_sizes: Sequence[int], order: Sequence[int], start: int, stop: int) -> list[Segment]:
    """The shard slices that cover samples [start, stop) of the ordered virtual sequence."""
    segments, offset = [], 0
    for shard in order:
        size = shard_sizes[shard]
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            segments.append(Segment(shard, lo - offset, hi - offset))
        offset += size
        if offset >= stop:
            break
    return segments


def shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer (as webdataset's), driven by an explicit RNG."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def shuffle_rng(seed: int, epoch: int, slot: int, number: int, shard: int, generation: int = 0) -> random.Random:
    """The RNG of a segment's shuffle buffer (generation 0 keeps the seeds of checkpoints written before rule 6)."""
    key = (seed, epoch, slot, number, shard) + ((generation,) if generation else ())
    return random.Random(hash(key))


MAX_HISTORY = 8
"""Layouts one epoch may pass through before its current one (each resume with another layout adds one)."""
LAYOUT_INTS = 6
"""Integers per Layout in the position shared with the workers (`Layout.as_ints`)."""


@dataclass(frozen=True)
class Layout:
    """How an epoch was read when a checkpoint was written: ranks, loader workers per rank (0 and 1 are the
    same: one slot per rank), rank-local batch size, drop_last, and the rank-local step reached."""

    world_size: int
    workers: int
    batch_size: int
    drop_last: bool
    step: int = 0
    mix_shards: int = 1
    """Lanes each slot interleaves (rule 3; 1 in checkpoints written before mixing existed)."""

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.workers)

    def reads_like(self, other: "Layout") -> bool:
        """Whether both lay an epoch out alike (the step aside): then a resume is bit-exact."""
        return (self.world_size, self.slots_per_rank, self.batch_size, self.drop_last, self.mix_shards) == \
            (other.world_size, other.slots_per_rank, other.batch_size, other.drop_last, other.mix_shards)

    def consumed(self, slot: int, limit: int) -> int:
        """Samples of slot `slot` (limit: its samples read per epoch) in the batches its rank consumed by `step`;
        rank-local step s comes from the slot s mod workers (`pipeline.data.stream` docstring, rule 4)."""
        workers = self.slots_per_rank
        virtual = slot % workers
        done = self.step // workers + (1 if virtual < self.step % workers else 0)
        return min(done * self.batch_size, limit)

    def as_ints(self) -> list[int]:
        return [self.world_size, self.workers, self.batch_size, int(self.drop_last), self.step, self.mix_shards]

    @classmethod
    def from_ints(cls, values: Sequence[int]) -> "Layout":
        world, workers, batch, drop, step, mix = (int(v) for v in values)
        return cls(world, workers, batch, bool(drop), step, mix)

    def describe(self) -> str:
        return f"{self.world_size} rank(s) x {self.workers} worker(s), batch {self.batch_size}"


def lane_buffer(shuffle_buffer: int, mix_shards: int) -> int:
    """A lane's shuffle buffer: the worker's buffer shared by its lanes, so a worker holds as many samples as
    with one lane (rule 3)."""
    return max(1, shuffle_buffer // mix_shards)


def lane_share(count: int, lane: int, mix_shards: int) -> int:
    """How many of a slot's first `count` positions fall to its lane number `lane` (round-robin, rule 3)."""
    return max(0, (count - lane + mix_shards - 1) // mix_shards)


class EpochPlan:
    """What each of `num_slots` slots reads in one epoch (`pipeline.data.stream` docstring, rules 2, 3 and 6).

    The plan's sequence is cut into `num_slots x mix_shards` consecutive lanes (training; evaluation: one lane per
    slot); slot g reads lanes g, g + num_slots, g + 2 num_slots, ... round-robin, so its j-th lane is as long as its
    round-robin share of the slot's samples (the first lanes one more). Generation 0 splits the epoch's
    virtual sequence (`order`); generation k > 0 splits `remaining`, the global ids (shard offset + index) the k
    earlier layouts of this epoch left unread, ordered by shard in the epoch's order, ascending within a shard.
    Training slots get equal lengths (total // num_slots); evaluation keeps all.
    """

    def __init__(self, sizes: Sequence[int], order: Sequence[int], num_slots: int, batch_size: int,
                 drop_last: bool, train: bool, remaining: Optional[np.ndarray] = None, generation: int = 0,
                 mix_shards: int = 1):
        self.sizes, self.order, self.num_slots = list(sizes), list(order), num_slots
        self.batch_size, self.drop_last, self.train = batch_size, drop_last, train
        self.remaining, self.generation = remaining, generation
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1]) if remaining is None else len(remaining)
        self.mix_shards = mix_shards if train else 1
        self.num_lanes = num_slots * self.mix_shards
        if train:  # every slot total // num_slots samples; its lanes differ by at most one (round-robin shares)
            per_slot = self.total // num_slots
            lengths = [lane_share(per_slot, lane // num_slots, self.mix_shards) for lane in range(self.num_lanes)]
        else:  # one lane per slot; every sample is read
            lengths = np.diff([lane * self.total // self.num_lanes for lane in range(self.num_lanes + 1)])
        self.lane_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def lanes(self, slot: int) -> list[int]:
        """The lanes slot `slot` interleaves, in round-robin order."""
        return [slot + number * self.num_slots for number in range(self.mix_shards)]

    def lane_range(self, lane: int) -> tuple[int, int]:
        """Positions [start, stop) of the plan's sequence that lane `lane` owns."""
        return int(self.lane_starts[lane]), int(self.lane_starts[lane + 1])

    def slot_length(self, slot: int) -> int:
        return sum(stop - start for start, stop in map(self.lane_range, self.lanes(slot)))

    def batches(self, slot: int) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return rounding(self.slot_length(slot) / self.batch_size)

    def limit(self, slot: int) -> int:
        """Samples the slot reads: its lanes, or (training with drop_last) only its full batches."""
        if self.train and self.drop_last:
            return self.batches(slot) * self.batch_size
        return self.slot_length(slot)

    def left_out(self) -> int:
        """Samples of the plan's sequence no slot reads (so every rank runs the same steps)."""
        return self.total - sum(self.limit(g) for g in range(self.num_slots))

    def segments(self, lane: int) -> list[Segment]:
        """The shard slices lane `lane` reads, in order."""
        start, stop = self.lane_range(lane)
        if self.remaining is None:
            return slot_segments(self.sizes, self.order, start, stop)
        ids = self.remaining[start:stop]
        shards = np.searchsorted(self.offsets, ids, side="right") - 1
        cuts = np.flatnonzero(np.diff(shards)) + 1
        segments = []
        for run, shard in zip(np.split(ids, cuts), shards[np.concatenate([[0], cuts])] if len(ids) else []):
            local = run - self.offsets[shard]
            segments.append(Segment(int(shard), int(local[0]), int(local[-1]) + 1, keep=local))
        return segments

    def unread(self, layout: Layout, seed: int, epoch: int, shuffle_buffer: int) -> np.ndarray:
        """Global ids this plan's slots still had to read when `layout` stopped at its step, in the epoch's
        shard order. A slot consumed the first samples of its stream, taken round-robin from its lanes; which
        ones a lane gave follows from replaying its shuffle buffers on indices alone (`shuffled` draws as a
        function of the count only)."""
        unread = np.zeros(int(self.offsets[-1]), dtype=bool)
        buffer = lane_buffer(shuffle_buffer, self.mix_shards)
        for slot in range(self.num_slots):
            limit = self.limit(slot)
            consumed = layout.consumed(slot, limit)
            for number, lane in enumerate(self.lanes(slot)):
                first = lane_share(consumed, number, self.mix_shards)
                self._lane_unread(unread, lane, first, lane_share(limit, number, self.mix_shards), seed, epoch,
                                  buffer)
        return np.concatenate([self.offsets[s] + np.flatnonzero(unread[self.offsets[s]:self.offsets[s + 1]])
                               for s in self.order]).astype(np.int64)

    def _lane_unread(self, unread: np.ndarray, lane: int, first: int, limit: int, seed: int, epoch: int,
                     buffer: int) -> None:
        """Mark the samples of lane positions [first, limit) in `unread`."""
        position = 0
        for number, segment in enumerate(self.segments(lane)):
            lo, hi = max(first, position), min(limit, position + segment.length)
            if lo < hi:
                local = segment.indices()
                if hi - lo < segment.length:  # partly read: which ones depends on the shuffle
                    rng = shuffle_rng(seed, epoch, lane, number, segment.shard, self.generation)
                    order = np.fromiter(shuffled(iter(range(segment.length)), buffer, rng),
                                        dtype=np.int64, count=segment.length)
                    local = local[order[lo - position:hi - position]]
                unread[self.offsets[segment.shard] + local] = True
            position += segment.length
            if position >= limit:
                break
