"""A deterministic, resumable WebDataset stream of batches.

How an epoch is laid out (the contract the resume logic relies on):

1. The split's shards are permuted by `(seed, epoch)` (training) or kept in order (evaluation),
   and their samples are seen as one virtual sequence of N samples.
2. There are W = world_size x workers_per_rank "slots". Slot g = rank * workers + v reads the
   contiguous range [g*N/W, (g+1)*N/W) of that sequence: it opens only the shards overlapping its
   range and skips (without decoding) to its first sample. Training drops the N mod W samples left
   over so every slot, hence every rank, yields the same number of batches: DDP never waits on a
   rank that ran out of data. Evaluation keeps every sample, so each is counted exactly once.
3. Inside a slot, samples pass a shuffle buffer that is reset at every shard boundary and seeded by
   `(seed, epoch, slot, segment)`. Augmentation is seeded per sample by its position. Hence a slot
   that has already produced `c` samples can restart at sample `c` by skipping whole shards and
   re-reading only the current one, and still produce the very same batches.
4. The DataLoader takes batches from its workers round-robin, and every worker holds the same number
   of batches, so rank-local step `s` comes from worker `s mod workers`. To restart at step `s`,
   physical worker p plays slot v = (p + s) mod workers; see `set_position`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.tar import tar_samples


@dataclass(frozen=True)
class Segment:
    """A slice [start, stop) of one shard's samples."""

    shard: int
    start: int
    stop: int


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


def _shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
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


class SampleCodec(Protocol):
    """What a stream does with each raw sample and each batch (see `pipeline.data.decode`)."""

    def sample(self, sample: dict, seed: int | None) -> object: ...

    def batch(self, items: list, labels: list[int]) -> tuple: ...


class ShardStream(IterableDataset):
    """Batches of (images, labels) from one split's shards for one rank; see the module docstring."""

    def __init__(self, shard_paths: Sequence[str], shard_sizes: Sequence[int], *, batch_size: int,
                 codec: SampleCodec, rank: int, world_size: int, num_workers: int,
                 seed: int, train: bool, shuffle_buffer: int = 1000, drop_last: bool = False):
        if len(shard_paths) != len(shard_sizes):
            raise ValueError("shard_paths and shard_sizes differ in length")
        self.shard_paths, self.shard_sizes = list(shard_paths), list(shard_sizes)
        self.batch_size, self.codec = batch_size, codec
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, num_workers)
        self.seed, self.train = seed, train
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        self.num_samples = sum(self.shard_sizes)
        self.num_slots = world_size * self.workers
        if train and self.num_samples < self.num_slots:
            raise ValueError(f"{self.num_samples} training samples cannot feed {world_size} rank(s) x "
                             f"{self.workers} worker(s); lower data.num_workers")
        # Shared with (even persistent) workers: the epoch and the rank-local step to start from.
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()

    # ---- position -------------------------------------------------------------------------------
    def set_position(self, epoch: int, step: int = 0) -> None:
        """Start the next iteration at `step` (batches already consumed by this rank) of `epoch`."""
        self._position[0], self._position[1] = epoch, step

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    # ---- layout ---------------------------------------------------------------------------------
    def slot_range(self, slot: int) -> tuple[int, int]:
        if self.train:
            per_slot = self.num_samples // self.num_slots
            return slot * per_slot, (slot + 1) * per_slot
        return slot * self.num_samples // self.num_slots, (slot + 1) * self.num_samples // self.num_slots

    def batches_in_slot(self, slot: int) -> int:
        start, stop = self.slot_range(slot)
        rounding = math.floor if self.drop_last else math.ceil
        return rounding((stop - start) / self.batch_size)

    def steps_per_epoch(self) -> int:
        """Batches this rank yields per epoch (identical on every rank when training)."""
        first = self.rank * self.workers
        return sum(self.batches_in_slot(first + v) for v in range(self.workers))

    def samples_per_epoch(self) -> int:
        """Samples this rank sees per epoch."""
        first = self.rank * self.workers
        total = 0
        for v in range(self.workers):
            start, stop = self.slot_range(first + v)
            full = (stop - start) // self.batch_size * self.batch_size
            total += full if self.drop_last else stop - start
        return total

    # ---- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        epoch, step = int(self._position[0]), int(self._position[1])
        virtual = (physical + step) % self.workers
        done_batches = step // self.workers + (1 if virtual < step % self.workers else 0)
        slot = self.rank * self.workers + virtual
        yield from self._slot_batches(epoch, slot, done_batches)

    def _slot_batches(self, epoch: int, slot: int, done_batches: int) -> Iterator:
        start, stop = self.slot_range(slot)
        order = epoch_shard_order(len(self.shard_paths), self.seed, epoch, self.train)
        segments = slot_segments(self.shard_sizes, order, start, stop)
        skip = done_batches * self.batch_size
        position = skip  # index of the next sample within this slot's stream
        items, labels = [], []
        for number, segment in enumerate(segments):
            length = segment.stop - segment.start
            if skip >= length:  # finished before the restart: not even opened
                skip -= length
                continue
            for sample in self._segment_samples(epoch, slot, number, segment, skip):
                # Augmentation is seeded by the sample's place in the epoch, so a restart reproduces it exactly.
                seed = hash((self.seed, epoch, slot, position)) & 0x7FFF_FFFF_FFFF_FFFF if self.train else None
                items.append(self.codec.sample(sample, seed))
                labels.append(int(sample["cls"]))
                position += 1
                if len(items) == self.batch_size:
                    yield self.codec.batch(items, labels)
                    items, labels = [], []
            skip = 0
        if items and not self.drop_last:
            yield self.codec.batch(items, labels)

    def _segment_samples(self, epoch: int, slot: int, number: int, segment: Segment, skip: int) -> Iterator[dict]:
        """Raw (undecoded) samples of a segment, shuffled, minus the first `skip` of them."""
        url = self.shard_paths[segment.shard]
        if not self.train:  # no shuffle: the skipped samples are not even read
            segment, skip = Segment(segment.shard, segment.start + skip, segment.stop), 0
        raw = tar_samples(url, segment.start, segment.stop)
        if self.train:
            rng = random.Random(hash((self.seed, epoch, slot, number, segment.shard)))
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        for index, sample in enumerate(raw):
            if index >= skip:
                yield sample


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over a ShardStream (batches are formed in the workers).

    The loader gets its own generator: otherwise each `iter(loader)` draws the workers' base seed
    from the global torch RNG, and a resumed run (which creates its iterator at a different moment)
    would see different dropout masks. The stream seeds its own randomness per sample anyway.
    """
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(stream.seed))


def shard_paths(root: str | Path, names: Sequence[str]) -> list[str]:
    return [str(Path(root) / name) for name in names]
