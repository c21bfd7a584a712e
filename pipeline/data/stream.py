"""A deterministic, resumable WebDataset stream of batches.

How an epoch is laid out (the contract the resume logic relies on):

1. The split's shards are permuted by `(seed, epoch)` (training) or kept in order (evaluation),
   and their samples are seen as one virtual sequence of N samples.
2. There are W = world_size x workers_per_rank "slots" (slot g = rank * workers + v), and in training each slot
   mixes k = mix_shards "lanes": the sequence is cut into k*W consecutive lanes, and slot g reads lanes g, g + W,
   g + 2W, ..., which lie spread over the whole epoch (evaluation: k = 1, slot g reads the contiguous range
   [g*N/W, (g+1)*N/W)). A lane opens only the shards overlapping it and skips (without decoding) to its first
   sample: where the index recorded that sample's byte offset, the shard is opened there (a seek locally, an
   HTTP Range request; `tar.placed_samples`), else the members before it are walked. Training gives every slot
   floor(N/W) samples, its lanes their round-robin shares of them (the first lanes one more), and drops the
   N mod W samples left over, so every slot, hence every rank, yields the same number of batches: DDP never waits
   on a rank that ran out of data. Evaluation keeps every sample, so each is counted exactly once, in order.
3. Inside a lane, samples pass a shuffle buffer of shuffle_buffer // k samples (a worker holds as many as with
   one lane) that is reset at every shard boundary and seeded by `(seed, epoch, lane, segment)`. A slot takes its
   lanes' samples in turn: its position p is sample p // k of its lane p mod k, so a batch of B holds about B/k
   samples of each of k places of the epoch (class-sorted shards give batches of many classes). Augmentation is
   seeded per sample by its slot position. Hence a slot that has already produced `c` samples can restart at
   sample `c`: each lane skips whole shards and re-reads only its current one, and the very same batches follow.
   Cost per worker: k open shards (files or connections), one read-ahead per lane sharing data.prefetch_mb, and
   8 bytes per sample of the split for the byte offsets (where the index has them).
4. The DataLoader takes batches from its workers round-robin, and every worker holds the same number
   of batches, so rank-local step `s` comes from worker `s mod workers`. To restart at step `s`,
   physical worker p plays slot v = (p + s) mod workers; see `set_position`.
5. Bad samples (see `pipeline.data.samples.faults`) never change a slot's length in training: a bad sample
   is replaced by the next good sample of the same shard slice (or, at the slice's end, by its
   first good one; failing that, by the first good sample of the split), transformed with the bad
   sample's own seed. The choice depends only on the data from that position on, so a restart
   makes the same choices without re-reading what it skips. Evaluation leaves bad samples out, so
   every good sample is counted exactly once. Each batch carries the fault counts of the positions
   it covers; a final empty batch carries any counts not yet delivered (evaluation only).

6. Elastic continuation. A checkpoint records its layout (`Layout`: ranks, workers, batch size, drop_last,
   rank-local step, mix_shards). Resumed in another layout, the epoch continues with what the old one left
   unread: slot g of the old layout had consumed the first c_g samples of its stream (c_g follows from the
   step, rule 4), hence each of its lanes its round-robin share of them (rule 3, with the old layout's k), and
   which (shard, index) those were follows from replaying its shuffle buffers on indices alone (`shuffled`
   draws as a function of the count only). The unread samples, ordered by shard in the epoch's order and by
   index within a shard, are cut into lanes for the new slots as in rules 2-3 (`EpochPlan` generation 1; a
   further change of layout in the same epoch makes generation 2, and so on). A new lane reads its pieces
   shard by shard, seeking to the first wanted sample and passing over the others, with shuffle buffers and
   augmentation seeded by the new lane or slot, position and generation. Memory: one boolean
   and one int64 per sample of the epoch while the plan is made (about 11 MB for ImageNet's 1.28M).

Guarantees: the order is a pure function of (seed, epoch, layout). At the same layout (world size, workers, batch
size, drop_last, mix_shards), a resume gives the very same batches (bit-exact). Across layouts (mix_shards
included), every sample of the epoch (as its first layout laid it out) is read exactly once over the old and new
processes, except the `EpochPlan.left_out()` samples the new layout
cannot share equally (fewer than its slot count; with drop_last, also each slot's tail short of a full
batch). A stream that draws with replacement (balance.py) is not `elastic`: the trainer restarts the epoch.

What a batch holds is the codec's business (`pipeline.data.samples.decode`): decoded, augmented images, or
the encoded bytes and augmentation parameters for decoding in the main process. Either way the
parameters come from the position's seed, so both give the same batches.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.dataset.keys import DEFAULT_KEYS, SampleKeys
from pipeline.data.io.counters import net_counters
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.readahead import prefetch
from pipeline.data.io.tar import tar_samples
from pipeline.data.plan import (
    LAYOUT_INTS,
    MAX_HISTORY,
    EpochPlan,
    Layout,
    Segment,
    epoch_shard_order,
    lane_buffer,
    lane_share,
    shuffle_rng,
    shuffled,
)
from pipeline.data.samples import faults
from pipeline.data.samples.faults import (
    NO_POSITION,
    FaultWarnings,
    SampleCheck,
    inspect_sample,
    missing_sample,
    replace_bad,
)
from pipeline.data.workers import track, worker_options
from pipeline.errors import short_error
from pipeline.exits import ShardChanged
from pipeline.testing import faults as injected


def shard_slice(url: str, start: int, stop: int, options: ReadOptions | None = None, at: int = 0) -> Iterator[dict]:
    """Raw samples [start, stop) of a shard, always stop - start of them: where the shard ends early
    (truncated, unreadable, or the network gave up: `pipeline.data.io.remote`), the missing ones are
    stand-ins (`faults.missing_sample`) carrying the reason. `at`: sample `start`'s byte offset (0: unknown)."""
    index = start
    raw = tar_samples(url, start, stop, options, at)  # the shard is opened at `at`, or walked to `start` unread
    try:
        for sample in raw:
            yield sample
            index += 1
        error = "it has fewer samples than the manifest says"
    except ShardChanged:  # reading on would mix two versions of the data: the run stops (exit 65)
        raise
    except Exception as exc:  # noqa: BLE001 - any other read error means the rest of the shard is lost
        error = short_error(exc, limit=300)  # a network failure names the URL and byte offset
    finally:
        raw.close()
    for missing in range(index, stop):
        yield missing_sample(url, missing, error)


def _kept(samples: Iterator[dict], start: int, keep: np.ndarray) -> Iterator[dict]:
    """The samples whose shard index (the first is `start`) is in `keep` (ascending)."""
    wanted = iter(keep.tolist())
    target = next(wanted, None)
    for index, sample in enumerate(samples, start=start):
        if index == target:
            yield sample
            target = next(wanted, None)
            if target is None:
                return


class NetworkDelta:
    """This process's network counters (`remote.net_counters`) since the previous batch, for its counts."""

    def __init__(self) -> None:
        self.last = net_counters()

    def add_to(self, counts: list[int]) -> None:
        now = net_counters()
        for name, key in faults.NETWORK_FIELDS.items():
            counts[faults.FIELDS.index(key)] += now[name] - self.last[name]
        self.last = now


class SampleCodec(Protocol):
    """What a stream does with each sample and batch (see `pipeline.data.samples.decode`)."""

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
                 image_size: Sequence[int] | None = None, keys: SampleKeys = DEFAULT_KEYS,
                 read_options: ReadOptions | None = None, mix_shards: int = 1,
                 sample_offsets: Sequence[Sequence[int]] = ()):
        if len(shard_paths) != len(shard_sizes):
            raise ValueError("shard_paths and shard_sizes differ in length")
        if sample_offsets and len(sample_offsets) != len(shard_paths):
            raise ValueError("sample_offsets and shard_paths differ in length")
        # What a good sample looks like (from the manifest); see pipeline.data.samples.faults.
        self.num_classes, self.image_mode, self.image_size = num_classes, image_mode, image_size
        self.keys = keys  # which members are the image and the label (see pipeline.data.dataset.keys)
        self.warnings = FaultWarnings(prefix=f"rank {rank}: " if world_size > 1 else "")
        self._fallback: SampleCheck | None = None
        self.shard_paths, self.shard_sizes = list(shard_paths), list(shard_sizes)
        self.read_options = read_options  # how shards are opened: retries, timeouts, cache (pipeline.data.io.remote)
        # Per shard, each sample's byte offset (empty: unknown); a lane opens a shard at its first sample's (rule 2).
        self.sample_offsets = [np.asarray(o, dtype=np.int64) for o in sample_offsets or [()] * len(shard_paths)]
        self.batch_size, self.codec = batch_size, codec
        self.mode = "L" if channels == 1 else "RGB"
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.workers = num_workers, max(1, num_workers)
        self.seed, self.train = seed, train
        self.shuffle_buffer, self.drop_last = shuffle_buffer, drop_last
        if mix_shards < 1:
            raise ValueError(f"mix_shards={mix_shards}: a worker reads at least 1 shard at a time")
        self.mix_shards = mix_shards  # lanes per training slot (rule 3); evaluation always reads one
        self.num_samples = sum(self.shard_sizes)
        self.num_slots = world_size * self.workers
        if train and self.num_samples < self.num_slots:
            raise ValueError(f"{self.num_samples} training samples cannot feed {world_size} rank(s) x "
                             f"{self.workers} worker(s); lower data.num_workers")
        # Shared with (even persistent) workers: the epoch, the rank-local step to start from, and the
        # earlier layouts of the epoch (a count, then 6 ints per Layout); see `set_position`.
        self._position = torch.zeros(3 + LAYOUT_INTS * MAX_HISTORY, dtype=torch.int64).share_memory_()
        self._plans: dict[tuple, EpochPlan] = {}  # per process: plans of the positions met so far
        self._generation = 0  # plan generation of the slot this process reads (seeds; one slot at a time)
        # Per loader worker, what it reads now: (shard + 1, index of the next sample to read, monotonic ms of the
        # last sample read); see `reading`.
        self._reading = torch.zeros((self.workers, 3), dtype=torch.int64).share_memory_()
        self._physical = 0  # the loader worker this process is (0 in the main process)

    elastic = True
    """Whether an epoch begun in another layout can be continued (rule 6); a resampling stream cannot."""

    # ---- position -------------------------------------------------------------------------------
    def set_position(self, epoch: int, step: int = 0, history: Sequence[Layout] = ()) -> None:
        """Start the next iteration at `step` (batches already consumed by this rank) of `epoch`.

        `history`: the layouts that read part of this epoch before this one, each with the step it stopped
        at (rule 6); empty for an epoch read in this layout from its start.
        """
        if len(history) > MAX_HISTORY:
            raise ValueError(f"an epoch can continue across at most {MAX_HISTORY} earlier layouts")
        if history and not self.train:
            raise ValueError("only a training stream continues an epoch begun in another layout")
        values = [epoch, step, len(history)] + [v for layout in history for v in layout.as_ints()]
        self._position.zero_()
        self._position[:len(values)] = torch.tensor(values, dtype=torch.int64)

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def history(self) -> tuple[Layout, ...]:
        """The earlier layouts of the current epoch (see `set_position`)."""
        values = self._position.tolist()
        return tuple(Layout.from_ints(values[3 + LAYOUT_INTS * i:3 + LAYOUT_INTS * (i + 1)]) for i in range(values[2]))

    def layout(self, step: int = 0) -> Layout:
        """This stream's layout, at rank-local `step`."""
        return Layout(self.world_size, self.num_workers, self.batch_size, self.drop_last, step,
                      self.mix_shards if self.train else 1)

    # ---- layout ---------------------------------------------------------------------------------
    def plan(self, epoch: Optional[int] = None) -> EpochPlan:
        """What every slot reads in `epoch` (default: the position's), given the epoch's earlier layouts."""
        epoch = self.epoch if epoch is None else epoch
        history = self.history
        key = (epoch, history)
        if key not in self._plans:
            self._plans = {key: self._make_plan(epoch, history)}  # one position at a time: keep one
        return self._plans[key]

    def _make_plan(self, epoch: int, history: tuple[Layout, ...]) -> EpochPlan:
        order = epoch_shard_order(len(self.shard_paths), self.seed, epoch, self.train)
        layouts = [*history, self.layout()]
        first = layouts[0]
        plan = EpochPlan(self.shard_sizes, order, first.world_size * first.slots_per_rank, first.batch_size,
                         first.drop_last, self.train, mix_shards=first.mix_shards)
        for generation, (done, layout) in enumerate(zip(layouts, layouts[1:]), start=1):
            remaining = plan.unread(done, self.seed, epoch, self.shuffle_buffer)
            plan = EpochPlan(self.shard_sizes, order, layout.world_size * layout.slots_per_rank, layout.batch_size,
                             layout.drop_last, self.train, remaining=remaining, generation=generation,
                             mix_shards=layout.mix_shards)
        return plan

    def batches_in_slot(self, slot: int) -> int:
        return self.plan().batches(slot)

    def steps_per_epoch(self) -> int:
        """Batches this rank yields in the position's epoch (identical on every rank when training); an epoch
        continued from another layout has the steps of what that layout left unread."""
        first = self.rank * self.workers
        return sum(self.batches_in_slot(first + v) for v in range(self.workers))

    def samples_per_epoch(self) -> int:
        """Samples this rank sees in the position's epoch."""
        plan, first = self.plan(), self.rank * self.workers
        return sum(plan.limit(first + v) for v in range(self.workers))

    # ---- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, fault counts) batches of this worker's slot; see the module docstring."""
        info = get_worker_info()
        yield from self.worker_batches(info.id if info is not None else 0)

    def worker_batches(self, physical: int) -> Iterator[tuple[object, torch.Tensor, torch.Tensor]]:
        """The batches loader worker `physical` yields from the position on (the DataLoader takes them round-robin)."""
        epoch, step = int(self._position[0]), int(self._position[1])
        self._physical = physical
        virtual = (physical + step) % self.workers
        done_batches = step // self.workers + (1 if virtual < step % self.workers else 0)
        slot = self.rank * self.workers + virtual
        yield from self._slot_batches(epoch, slot, done_batches)

    def batch_sample_keys(self, epoch: int, step: int) -> list[str]:
        """`shard/key` of the samples in rank-local micro-batch `step` of `epoch`: the slot's own sample sequence
        (step s comes from slot s mod workers, batch s // workers; see rule 4 above), replayed from the batch's
        first position, with bad samples replaced exactly as the loader replaced them."""
        slot = self.rank * self.workers + step % self.workers
        first = step // self.workers * self.batch_size
        fed = (source for _, _, source in self._slot_samples(epoch, slot, first) if source is not None)
        return [f"{Path(source.url).name}/{source.key}" for source in itertools.islice(fed, self.batch_size)]

    def _seed(self, epoch: int, slot: int, position: int) -> Optional[int]:
        """Augmentation is seeded by the sample's place in the epoch, so a restart reproduces it exactly."""
        if not self.train:
            return None
        key = (self.seed, epoch, slot, position) + ((self._generation,) if self._generation else ())
        return hash(key) & 0x7FFF_FFFF_FFFF_FFFF

    def _slot_batches(self, epoch: int, slot: int, done_batches: int) -> Iterator:
        items, labels, counts = [], [], [0] * len(faults.FIELDS)
        network = NetworkDelta()
        injected.in_worker(done_batches, self.train)
        for position, check, source in self._slot_samples(epoch, slot, done_batches * self.batch_size):
            faults.count(counts, check)
            if source is None:  # evaluation: a bad sample is left out
                continue
            items.append(self.codec.sample(source, self._seed(epoch, slot, position)))
            labels.append(source.label)
            if len(items) == self.batch_size:
                network.add_to(counts)
                yield self.codec.batch(items), self.keys.collate(labels, self.num_classes), torch.tensor(counts)
                items, labels, counts = [], [], [0] * len(faults.FIELDS)
                done_batches += 1
                injected.in_worker(done_batches, self.train)
        network.add_to(counts)
        if items and not self.drop_last:
            yield self.codec.batch(items), self.keys.collate(labels, self.num_classes), torch.tensor(counts)
        elif any(counts):  # counts of samples that made no batch (evaluation: all bad, or after the last batch)
            yield torch.empty(0), torch.empty(0, dtype=torch.long), torch.tensor(counts)

    def _slot_samples(self, epoch: int, slot: int, skip: int) -> Iterator[tuple[int, SampleCheck, SampleCheck | None]]:
        """(position, inspection, what to feed) for every position of the slot from `skip` on: its lanes'
        samples taken round-robin (rule 3); position p is lane p mod mix_shards's sample p // mix_shards."""
        plan = self.plan(epoch)
        self._generation = plan.generation
        limit = plan.limit(slot)  # with drop_last, the tail that makes no full batch is not even read
        mix = plan.mix_shards
        lanes = [self._lane_samples(epoch, slot, number, lane, lane_share(skip, number, mix), mix)
                 for number, lane in enumerate(plan.lanes(slot))]
        try:
            for position in range(skip, limit):
                check, source = next(lanes[position % mix])
                yield position, check, source
        finally:
            for lane in lanes:
                lane.close()  # the lanes' open shards (and connections) go now, not when collected

    def _lane_samples(self, epoch: int, slot: int, number: int, lane: int, skip: int,
                      mix: int) -> Iterator[tuple[SampleCheck, SampleCheck | None]]:
        """(inspection, what to feed) for the samples of lane `lane` (the slot's lane `number`) from `skip` on;
        the lane's position q is the slot's position q * mix + number (augmentation seeds)."""
        plan = self.plan(epoch)
        segments = plan.segments(lane)
        for index, segment in enumerate(segments):
            length = segment.length
            if skip >= length:  # finished before the restart: not even opened
                skip -= length
                continue
            self._read_ahead(segments[index + 1:index + 2], mix)
            position = sum(s.length for s in segments[:index]) + skip
            yield from self._resolved(epoch, slot, lane, index, segment, skip,
                                      lambda q: q * mix + number, position)
            skip = 0

    def _read_ahead(self, following: list[Segment], mix: int) -> None:
        """Open the lane's next remote shard (at its first sample, where that is known: its start or an indexed
        offset) while this one is read; see `remote.prefetch`. The worker's read-ahead budget (data.prefetch_mb) is
        shared by its lanes."""
        if not following:
            return
        segment = following[0]
        offset = self._placed(segment.shard, segment.start)
        if segment.start == 0 or offset:
            options = self.read_options or ReadOptions()
            if mix > 1:
                options = replace(options, prefetch_mb=options.prefetch_mb / mix)
            prefetch(self.shard_paths[segment.shard], options, keep=mix + 1, offset=offset)

    def _placed(self, shard: int, index: int) -> int:
        """Byte offset where sample `index` of shard `shard` begins, from the index; 0 when unknown (the reader
        then walks from the shard's start) or for sample 0."""
        offsets = self.sample_offsets[shard]
        return int(offsets[index]) if index < len(offsets) else 0

    def _resolved(self, epoch: int, slot: int, lane: int, number: int, segment: Segment, skip: int,
                  in_slot: Callable[[int], int], position: int) -> Iterator[tuple[SampleCheck, SampleCheck | None]]:
        """(inspection, what to feed) per sample of a lane's segment from `skip` on; see rule 5 above.

        `position` is the lane position of the first pair (`in_slot` maps it to the slot's); a sample is inspected
        (decoded) for its own position, which follows the bad samples still waiting for it.
        """
        checks = self._checked(self._segment_samples(epoch, lane, number, segment, skip),
                               lambda k: self._seed(epoch, slot, in_slot(position + k)))
        if self.train:
            first_good = partial(self._first_good, epoch, lane, number, segment)
            yield from replace_bad(checks, lambda check: check.ok, first_good)
        else:
            yield from ((check, check if check.ok else None) for check in checks)

    def _checked(self, samples: Iterator[dict], seed: Callable[[int], Optional[int]]) -> Iterator[SampleCheck]:
        """The inspection of each sample (the k-th with `seed(k)`: its own position), warned about as it is made."""
        action = "replaced by another sample of the same shard" if self.train else "left out of evaluation"
        for k, sample in enumerate(samples):
            check = self._inspect(sample, seed(k))
            for bad in check.undrawn:  # carried by a resampling stream (balance.py): never drawn
                self.warnings(bad, "never drawn")
            if check.reason or check.converted:
                self.warnings(check, action)
            yield check

    def _inspect(self, sample: dict, seed: Optional[int]) -> SampleCheck:
        return inspect_sample(sample, self.mode, self.num_classes, self.image_mode, self.image_size,
                              decode=partial(self.codec.decode, seed=seed), keys=self.keys)

    def _first_good(self, epoch: int, lane: int, number: int, segment: Segment) -> SampleCheck:
        """The segment's first good sample; if it has none, the split's (shards in order)."""
        for sample in self._segment_samples(epoch, lane, number, segment, 0):
            check = self._inspect(sample, NO_POSITION)
            if check.ok:
                return check
        if self._fallback is None:
            inspect = partial(self._inspect, seed=NO_POSITION)
            for path, size in zip(self.shard_paths, self.shard_sizes):
                samples = shard_slice(path, 0, size, self.read_options)
                self._fallback = next((c for c in map(inspect, samples) if c.ok), None)
                if self._fallback is not None:
                    break
            else:
                raise ValueError(f"no readable sample in any of the {len(self.shard_paths)} shard(s) "
                                 f"starting with '{self.shard_paths[0]}'; check them with `pipeline data verify`")
        return self._fallback

    def _segment_samples(self, epoch: int, lane: int, number: int, segment: Segment, skip: int) -> Iterator[dict]:
        """Raw (undecoded) samples of a lane's segment `number`, shuffled, minus the first `skip` of them; always
        `segment.length - skip` of them (missing ones are stand-ins, see `shard_slice`)."""
        if not self.train:  # no shuffle: the skipped samples are not even read
            segment, skip = Segment(segment.shard, segment.start + skip, segment.stop), 0
        raw = shard_slice(self.shard_paths[segment.shard], segment.start, segment.stop, self.read_options,
                          self._placed(segment.shard, segment.start))
        raw = self._published(raw, segment.shard, segment.start)
        if segment.keep is not None:
            raw = _kept(raw, segment.start, segment.keep)
        if self.train:
            rng = shuffle_rng(self.seed, epoch, lane, number, segment.shard, self._generation)
            raw = shuffled(raw, lane_buffer(self.shuffle_buffer, self.plan(epoch).mix_shards), rng)
        for index, sample in enumerate(raw):
            if index >= skip:
                yield sample

    def _published(self, samples: Iterator[dict], shard: int, start: int) -> Iterator[dict]:
        """`samples` of shard `shard` from index `start`, each read published as this worker's position."""
        row = self._reading[self._physical].numpy()  # shared memory: the main process reads it (`reading`)
        row[:] = (shard + 1, start, time.monotonic() * 1000)
        for sample in samples:
            row[2] = time.monotonic() * 1000
            yield sample
            row[1] += 1

    def stalest_worker(self) -> int:
        """The loader worker that read its last sample longest ago."""
        return int(self._reading[:, 2].argmin())

    def reading(self, worker: int) -> str:
        """What loader worker `worker` was reading when it last read a sample: its shard and the sample's index."""
        shard, index, _ = (int(v) for v in self._reading[worker])
        if not shard:
            return "it had not opened a shard yet"
        return f"it was reading shard '{self.shard_paths[shard - 1]}' at sample {index}"


def make_loader(stream: ShardStream, num_workers: int, pin_memory: bool,
                start_method: str = "forkserver", timeout_s: float = 0.0) -> DataLoader:
    """A DataLoader over a ShardStream (batches are formed in the workers).

    The loader gets its own generator: otherwise each `iter(loader)` draws the workers' base seed
    from the global torch RNG, and a resumed run (which creates its iterator at a different moment)
    would see different dropout masks. The stream seeds its own randomness per sample anyway.
    `timeout_s` (0: none): the longest the loader waits for a worker's next batch (`SplitLoader` says which).
    """
    return track(DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(stream.seed),
                            **worker_options(num_workers, start_method, timeout_s)))


def shard_paths(root: str | Path, names: Sequence[str]) -> list[str]:
    """Where the shards are: names relative to `root` (our manifests), or as they are (absolute paths, URLs)."""
    return [name if "://" in name or name.startswith("pipe:") or os.path.isabs(name) else str(Path(root) / name)
            for name in names]
