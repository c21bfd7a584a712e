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
5. Bad samples (see `pipeline.data.faults`) never change a slot's length in training: a bad sample
   is replaced by the next good sample of the same shard slice (or, at the slice's end, by its
   first good one; failing that, by the first good sample of the split), transformed with the bad
   sample's own seed. The choice depends only on the data from that position on, so a restart
   makes the same choices without re-reading what it skips. Evaluation leaves bad samples out, so
   every good sample is counted exactly once. Each batch carries the fault counts of the positions
   it covers; a final empty batch carries any counts not yet delivered (evaluation only).

What a batch holds is the codec's business (`pipeline.data.decode`): decoded, augmented images, or
the encoded bytes and augmentation parameters for decoding in the main process. Either way the
parameters come from the position's seed, so both give the same batches.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import fault_injection
from pipeline.data import faults
from pipeline.data.faults import FaultWarnings, SampleCheck, inspect_sample, missing_sample, short_error
from pipeline.data.keys import DEFAULT_KEYS, SampleKeys
from pipeline.data.tar import tar_samples
from pipeline.data.workers import init_worker, track, worker_context

NO_POSITION = -1
"""The seed given when inspecting a sample whose position is not known yet (a fill-in for bad ones)."""


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


def shard_slice(url: str, start: int, stop: int) -> Iterator[dict]:
    """Raw samples [start, stop) of a shard, always stop - start of them: where the shard ends early
    (truncated, unreadable), the missing ones are stand-ins (`faults.missing_sample`)."""
    index = start
    raw = tar_samples(url, start, stop)  # samples before `start` are seeked past, not read
    try:
        for sample in raw:
            yield sample
            index += 1
        error = "it has fewer samples than the manifest says"
    except Exception as exc:  # noqa: BLE001 - any read error means the rest of the shard is lost
        error = short_error(exc)
    finally:
        raw.close()
    for missing in range(index, stop):
        yield missing_sample(url, missing, error)


class SampleCodec(Protocol):
    """What a stream does with each sample and batch (see `pipeline.data.decode`)."""

    def decode(self, image: Image.Image, data: bytes, key: str, seed: Optional[int]) -> object:
        """The inspection's decoding (raise if the image is bad), for the position with `seed`."""

    def sample(self, source: SampleCheck, seed: Optional[int]) -> object:
        """The batch item of a good sample fed at the position with `seed`."""

    def batch(self, items: list) -> object:
        """The batch's images (or what stands for them) from its items."""


class ShardStream(IterableDataset):
    """Batches of (images, labels, fault counts) from one split's shards for one rank; see the module docstring."""

    def __init__(self, shard_paths: Sequence[str], shard_sizes: Sequence[int], *, batch_size: int,
                 codec: SampleCodec, channels: int, rank: int, world_size: int, num_workers: int,
                 seed: int, train: bool, shuffle_buffer: int = 1000, drop_last: bool = False,
                 num_classes: int | None = None, image_mode: str | None = None,
                 image_size: Sequence[int] | None = None, keys: SampleKeys = DEFAULT_KEYS):
        if len(shard_paths) != len(shard_sizes):
            raise ValueError("shard_paths and shard_sizes differ in length")
        # What a good sample looks like (from the manifest); see pipeline.data.faults.
        self.num_classes, self.image_mode, self.image_size = num_classes, image_mode, image_size
        self.keys = keys  # which members are the image and the label (see pipeline.data.keys)
        self.warnings = FaultWarnings(prefix=f"rank {rank}: " if world_size > 1 else "")
        self._fallback: SampleCheck | None = None
        self.shard_paths, self.shard_sizes = list(shard_paths), list(shard_sizes)
        self.batch_size, self.codec = batch_size, codec
        self.mode = "L" if channels == 1 else "RGB"
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
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, fault counts) batches of this worker's slot; see the module docstring."""
        info = get_worker_info()
        physical = info.id if info is not None else 0
        epoch, step = int(self._position[0]), int(self._position[1])
        virtual = (physical + step) % self.workers
        done_batches = step // self.workers + (1 if virtual < step % self.workers else 0)
        slot = self.rank * self.workers + virtual
        yield from self._slot_batches(epoch, slot, done_batches)

    def _seed(self, epoch: int, slot: int, position: int) -> Optional[int]:
        """Augmentation is seeded by the sample's place in the epoch, so a restart reproduces it exactly."""
        if not self.train:
            return None
        return hash((self.seed, epoch, slot, position)) & 0x7FFF_FFFF_FFFF_FFFF

    def _slot_batches(self, epoch: int, slot: int, done_batches: int) -> Iterator:
        items, labels, counts = [], [], [0] * len(faults.FIELDS)
        fault_injection.in_worker(done_batches, self.train)
        for position, check, source in self._slot_samples(epoch, slot, done_batches * self.batch_size):
            faults.count(counts, check)
            if source is None:  # evaluation: a bad sample is left out
                continue
            items.append(self.codec.sample(source, self._seed(epoch, slot, position)))
            labels.append(source.label)
            if len(items) == self.batch_size:
                yield self.codec.batch(items), torch.tensor(labels, dtype=torch.long), torch.tensor(counts)
                items, labels, counts = [], [], [0] * len(faults.FIELDS)
                done_batches += 1
                fault_injection.in_worker(done_batches, self.train)
        if items and not self.drop_last:
            yield self.codec.batch(items), torch.tensor(labels, dtype=torch.long), torch.tensor(counts)
        elif counts[0]:  # counts of samples that made no batch (evaluation: all bad, or after the last batch)
            yield torch.empty(0), torch.empty(0, dtype=torch.long), torch.tensor(counts)

    def _slot_samples(self, epoch: int, slot: int, skip: int) -> Iterator[tuple[int, SampleCheck, SampleCheck | None]]:
        """(position, inspection, what to feed) for every position of the slot from `skip` on."""
        start, stop = self.slot_range(slot)
        limit = stop - start
        if self.train and self.drop_last:  # the tail that makes no full batch is not even read
            limit = self.batches_in_slot(slot) * self.batch_size
        order = epoch_shard_order(len(self.shard_paths), self.seed, epoch, self.train)
        segments = slot_segments(self.shard_sizes, order, start, stop)
        position = skip  # index of the next sample within this slot's stream
        for number, segment in enumerate(segments):
            length = segment.stop - segment.start
            if skip >= length:  # finished before the restart: not even opened
                skip -= length
                continue
            for check, source in self._resolved(epoch, slot, number, segment, skip, position):
                if position >= limit:
                    return
                yield position, check, source
                position += 1
            skip = 0

    def _resolved(self, epoch: int, slot: int, number: int, segment: Segment, skip: int,
                  position: int) -> Iterator[tuple[SampleCheck, SampleCheck | None]]:
        """(inspection, what to feed) per sample of a segment from `skip` on; see rule 5 above.

        `position` is that of the first pair; a sample is inspected (decoded) for its own position,
        which follows the bad samples still waiting for it.
        """
        action = "replaced by another sample of the same shard" if self.train else "left out of evaluation"
        pending: list[SampleCheck] = []  # bad samples waiting for the next good one (training)
        for sample in self._segment_samples(epoch, slot, number, segment, skip):
            check = self._inspect(sample, self._seed(epoch, slot, position + len(pending)))
            for bad in check.undrawn:  # carried by a resampling stream (balance.py): never drawn
                self.warnings(bad, "never drawn")
            if check.reason or check.converted:
                self.warnings(check, action)
            if check.ok:
                yield from ((bad, check) for bad in pending)
                position += len(pending) + 1
                pending = []
                yield check, check
            elif self.train:
                pending.append(check)
            else:
                position += 1
                yield check, None
        if pending:
            fill = self._first_good(epoch, slot, number, segment)
            yield from ((bad, fill) for bad in pending)

    def _inspect(self, sample: dict, seed: Optional[int]) -> SampleCheck:
        return inspect_sample(sample, self.mode, self.num_classes, self.image_mode, self.image_size,
                              decode=partial(self.codec.decode, seed=seed), keys=self.keys)

    def _first_good(self, epoch: int, slot: int, number: int, segment: Segment) -> SampleCheck:
        """The segment's first good sample; if it has none, the split's (shards in order)."""
        for sample in self._segment_samples(epoch, slot, number, segment, 0):
            check = self._inspect(sample, NO_POSITION)
            if check.ok:
                return check
        if self._fallback is None:
            inspect = partial(self._inspect, seed=NO_POSITION)
            for path, size in zip(self.shard_paths, self.shard_sizes):
                self._fallback = next((c for c in map(inspect, shard_slice(path, 0, size)) if c.ok), None)
                if self._fallback is not None:
                    break
            else:
                raise ValueError(f"no readable sample in any of the {len(self.shard_paths)} shard(s) "
                                 f"starting with '{self.shard_paths[0]}'; check them with `pipeline data verify`")
        return self._fallback

    def _segment_samples(self, epoch: int, slot: int, number: int, segment: Segment, skip: int) -> Iterator[dict]:
        """Raw (undecoded) samples of a segment, shuffled, minus the first `skip` of them; always
        `segment.stop - segment.start - skip` of them (missing ones are stand-ins, see `shard_slice`)."""
        if not self.train:  # no shuffle: the skipped samples are not even read
            segment, skip = Segment(segment.shard, segment.start + skip, segment.stop), 0
        raw = shard_slice(self.shard_paths[segment.shard], segment.start, segment.stop)
        if self.train:
            rng = random.Random(hash((self.seed, epoch, slot, number, segment.shard)))
            raw = _shuffled(raw, self.shuffle_buffer, rng)
        for index, sample in enumerate(raw):
            if index >= skip:
                yield sample


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool,
                start_method: str = "forkserver") -> DataLoader:
    """A DataLoader over a ShardStream (batches are formed in the workers).

    The loader gets its own generator: otherwise each `iter(loader)` draws the workers' base seed
    from the global torch RNG, and a resumed run (which creates its iterator at a different moment)
    would see different dropout masks. The stream seeds its own randomness per sample anyway.
    """
    workers = {}
    if num_workers > 0:
        workers = {"multiprocessing_context": worker_context(start_method), "persistent_workers": True,
                   "prefetch_factor": 4, "worker_init_fn": partial(init_worker, os.getpid())}
    return track(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(stream.seed), **workers))


def shard_paths(root: str | Path, names: Sequence[str]) -> list[str]:
    """Where the shards are: names relative to `root` (our manifests), or as they are (absolute paths, URLs)."""
    return [name if "://" in name or name.startswith("pipe:") or os.path.isabs(name) else str(Path(root) / name)
            for name in names]
