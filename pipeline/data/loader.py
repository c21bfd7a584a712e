"""The loader of one split on one rank: its stream (position, counts) and the DataLoader that iterates it, built from
the config by `build_stream` and `build_loader`.

Importing this module is cheap: the stream and its workers, decoding and augmentation (torch, torchvision) are
imported when a loader is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from pipeline.config.schema import Config
from pipeline.data.dataset.manifest import Manifest

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader

    from pipeline.data.loader_state import Continuation
    from pipeline.data.stream import ShardStream
    from pipeline.exits import WorkerStuck


class SplitLoader:
    """A split's stream (for position and counts) and the DataLoader that iterates it.

    Iterating `loader` gives (images, labels) batches, ready on the training device: `finish` (see
    `pipeline.data.samples.decode`) turns what the workers sent into them, in the main process. The fault
    counts each batch carries (see `pipeline.data.samples.faults`; `finish` adds the images it could not
    decode) are added to `bad_samples` (`BadSampleCounts`), this rank's total over the batches consumed.

    It keeps its own position: the epoch (`stream.epoch`; the next one once an epoch is read to its end) and
    `step`, the batches of it handed out in this layout. `state_dict()` saves that position with the epoch's
    earlier layouts and the counts; `load_state_dict` goes on from it (see `pipeline.data.loader_state`).
    """

    def __init__(self, stream: ShardStream, dataloader: DataLoader, finish: Optional[Callable] = None):
        from pipeline.data.samples import faults

        self.stream, self.dataloader, self.finish = stream, dataloader, finish
        self.bad_samples = faults.BadSampleCounts()
        self.step = 0  # batches of the current epoch handed out (in this layout)

    def set_position(self, epoch: int, step: int = 0, history: Sequence = ()) -> None:
        """See `ShardStream.set_position` (`history`: earlier layouts of a continued epoch)."""
        self.stream.set_position(epoch, step, history)
        self.step = step

    def start_epoch(self, epoch: int) -> int:
        """Begin `epoch`, or go on with it where a resume put the loader (with its earlier layouts); the number of
        those layouts."""
        from pipeline.data import loader_state

        return loader_state.start_epoch(self, epoch)

    def state_dict(self) -> dict:
        """Its position and layout, the epoch's earlier layouts and its bad-sample counts (`loader_state`)."""
        from pipeline.data import loader_state

        return loader_state.state_dict(self)

    def load_state_dict(self, state: dict, rank_states: Callable) -> Continuation:
        """Resume where `state` was saved, in this layout or another (`loader_state.load_state_dict`)."""
        from pipeline.data import loader_state

        return loader_state.load_state_dict(self, state, rank_states)

    def from_start(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A pass over the split from its start (evaluation: epoch 0, every sample once)."""
        self.set_position(0)
        return self.loader

    @property
    def loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from pipeline.data.workers import timed_out

        batches = None
        while True:
            try:  # persistent workers: `iter` already waits for each one to take up the new epoch
                if batches is None:
                    batches = iter(self.dataloader)
                images, labels, counts = next(batches)
            except StopIteration:  # the epoch is read: the loader stands at the next one's start
                self.set_position(self.stream.epoch + 1)
                return
            except RuntimeError as exc:
                if not timed_out(exc):
                    raise
                raise self._stuck() from None
            if labels.numel() and self.finish is not None:  # (it may find and count more bad samples)
                images, labels = self.finish(images, labels, counts)
            self.bad_samples.add(counts)
            if labels.numel():  # an empty batch only carries counts (evaluation)
                self.step += 1
                yield images, labels

    def _stuck(self) -> WorkerStuck:
        """The error for a worker that delivered nothing for data.worker_timeout_s; the caller ends the workers."""
        from pipeline.data.workers import waited_on, worker_pid
        from pipeline.exits import WorkerStuck

        stream = self.stream
        worker = waited_on(self.dataloader)
        worker = stream.stalest_worker() if worker is None else worker  # (while it waited for all to start)
        pid = worker_pid(self.dataloader, worker)
        who = f"rank {stream.rank}: " if stream.world_size > 1 else ""
        data = "training" if stream.train else "evaluation"
        return WorkerStuck(f"{who}loader worker {worker} (pid {pid}) delivered no {data} batch for "
                           f"{self.dataloader.timeout:g} s (data.worker_timeout_s); {stream.reading(worker)}. "
                           "The last complete checkpoint is kept: rerun the same command to resume from it (raise "
                           "data.worker_timeout_s if reads are legitimately this slow)")


def build_stream(cfg: Config, manifest: Manifest, split: str, rank: int, world_size: int,
                 train: bool, batch_size: int | None = None, codec: object = None) -> ShardStream:
    """The split's stream for one rank; `codec` (default: decode and augment in the workers, uint8 batches)
    turns samples into batch items, see `pipeline.data.samples.decode`."""
    from pipeline.data.dataset.resolve import read_options, sample_keys
    from pipeline.data.samples.decode import build_decoding
    from pipeline.data.stream import ShardStream, shard_paths

    info = manifest.split(split)
    kind, extra = ShardStream, {}
    if train and cfg.imbalance.balanced_sampling:
        from pipeline.data.balance import BalancedShardStream, class_counts

        kind, extra = BalancedShardStream, {"class_counts": class_counts(manifest, split)}
    return kind(
        shard_paths(cfg.data.root, [s.name for s in info.shards]), [s.num_samples for s in info.shards],
        batch_size=batch_size or (cfg.train.batch_size if train else cfg.train.eval_batch_size),
        codec=codec or build_decoding(cfg.data, train)[0], channels=cfg.data.channels, rank=rank,
        world_size=world_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed, train=train,
        shuffle_buffer=cfg.data.shuffle_buffer, drop_last=cfg.data.drop_last and train,
        num_classes=manifest.num_classes, image_mode=manifest.image_mode or None, image_size=manifest.image_size,
        keys=sample_keys(cfg.data, manifest.classes, cfg.task), read_options=read_options(cfg.data, info.shards),
        mix_shards=cfg.data.mix_shards, sample_offsets=[s.offsets for s in info.shards], **extra)


def build_loader(cfg: Config, manifest: Manifest, split: str, rank: int, world_size: int,
                 train: bool, pin_memory: bool = False, device: Optional[torch.device] = None) -> SplitLoader:
    """The loader for one split on one rank; its batches are ready for the model on `device` (None: CPU)."""
    from pipeline.data.samples.decode import build_decoding
    from pipeline.data.stream import make_loader

    codec, finish = build_decoding(cfg.data, train, device, warn_prefix=f"rank {rank}: " if world_size > 1 else "")
    stream = build_stream(cfg, manifest, split, rank, world_size, train, codec=codec)
    loader = make_loader(stream, cfg.data.num_workers, pin_memory and cfg.data.pin_memory, cfg.data.worker_start,
                         cfg.data.worker_timeout_s)
    return SplitLoader(stream, loader, finish)
