"""Elastic resume: an epoch begun in one layout (ranks x workers) and continued in another reads every
sample once; the few the new layout must leave out are counted (pipeline.data.stream, rule 6)."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from PIL import Image

from pipeline.data.plan import Layout
from pipeline.data.plan import shuffled as _shuffled
from pipeline.data.samples import faults
from pipeline.data.stream import ShardStream
from tests.support.codecs import KeyCodec

SIZES = [13, 40, 7, 25, 31, 9, 22]  # 147 samples; shards smaller and larger than the shuffle buffer
BUFFER = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """Tiny tar shards of 1x1 PNGs with a class each (WebDataset layout: key.png + key.cls)."""
    root = tmp_path_factory.mktemp("elastic")
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    png = buffer.getvalue()
    paths = []
    for number, size in enumerate(SIZES):
        path = root / f"shard-{number:02d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(size):
                for ext, data in (("png", png), ("cls", str(index % 3).encode())):
                    info = tarfile.TarInfo(f"s{number:02d}_{index:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _streams(paths: list[str], world: int, workers: int, batch: int, drop_last: bool,
             mix: int = 1) -> list[ShardStream]:
    return [ShardStream(paths, SIZES, batch_size=batch, codec=KeyCodec(), channels=1, rank=rank, world_size=world,
                        num_workers=workers, seed=3, train=True, shuffle_buffer=BUFFER, drop_last=drop_last,
                        num_classes=3, mix_shards=mix) for rank in range(world)]


def _rank_batches(stream: ShardStream) -> list[list[str]]:
    """A rank's batches as the DataLoader yields them: its workers' batches taken round-robin."""
    workers = [stream.worker_batches(p) for p in range(stream.workers)]
    batches = []
    for chosen in itertools.cycle(workers):
        batch = next(chosen, None)
        if batch is None:
            return batches
        batches.append(batch[0])


def _read(streams: list[ShardStream], epoch: int, step: int = 0, history: tuple = (),
          stop_at: Optional[int] = None) -> list[str]:
    """Every sample the ranks read from `step` on (up to rank-local step `stop_at`); equal steps asserted."""
    keys, steps = [], set()
    for stream in streams:
        stream.set_position(epoch, step, history)
        batches = _rank_batches(stream)
        assert len(batches) == stream.steps_per_epoch() - step
        steps.add(len(batches))
        keys += [k for batch in batches[:None if stop_at is None else stop_at - step] for k in batch]
    assert len(steps) == 1
    return keys


def test_shuffle_buffer_draws_depend_only_on_the_count() -> None:
    import random

    items = [f"x{i}" for i in range(53)]
    shuffled = list(_shuffled(iter(items), 8, random.Random(7)))
    order = list(_shuffled(iter(range(53)), 8, random.Random(7)))
    assert shuffled == [items[i] for i in order] and sorted(order) == list(range(53))


PAIRS = [((2, 2), (1, 0)), ((1, 0), (2, 2)), ((2, 1), (1, 3)), ((1, 2), (1, 0)), ((3, 1), (2, 2))]


def _check_continuation(paths: list[str], old: tuple, new: tuple, batch: int, drop_last: bool,
                        new_batch: Optional[int] = None, mix: tuple[int, int] = (1, 1)) -> None:
    """Cut the epoch in layout `old` (ranks, workers) at several steps, continue in `new`: each sample once.
    `mix`: shards each worker mixes in the old and the new layout."""
    epoch, new_batch = 2, new_batch or batch
    before = _streams(paths, *old, batch, drop_last, mix[0])
    whole = _read(before, epoch)  # the uninterrupted epoch in the old layout
    assert len(whole) == len(set(whole))
    for step in (1, 2, 3, before[0].steps_per_epoch() - 1):
        done = _read(before, epoch, stop_at=step)
        after = _streams(paths, *new, new_batch, drop_last, mix[1])
        rest = _read(after, epoch, 0, (Layout(old[0], old[1], batch, drop_last, step, mix[0]),))
        left_out = after[0].plan(epoch).left_out()
        assert len(rest) == len(set(rest)) and not set(rest) & set(done)
        assert set(done) | set(rest) <= set(whole)
        assert len(done) + len(rest) + left_out == len(whole)
        unread, slots = len(whole) - len(done), after[0].num_slots
        per_slot = unread // slots // new_batch * new_batch if drop_last else unread // slots
        assert left_out == unread - slots * per_slot  # the equal share of the unread; drop_last: full batches


@pytest.mark.parametrize("old, new", PAIRS)
@pytest.mark.parametrize("batch, drop_last", [(4, False), (5, True)])
def test_continued_epoch_reads_every_sample_once(shards: list[str], old, new, batch: int, drop_last: bool) -> None:
    _check_continuation(shards, old, new, batch, drop_last)


@pytest.mark.parametrize("drop_last", [False, True])
def test_continued_epoch_with_another_batch_size(shards: list[str], drop_last: bool) -> None:
    """(checkpoint.resume_changes=allow): the old layout's batch size says what it read."""
    _check_continuation(shards, (2, 1), (1, 2), 4, drop_last, new_batch=6)


MIXES = [(3, 3), (4, 1), (1, 2)]


@pytest.mark.parametrize("old, new", PAIRS[:3])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("batch, drop_last", [(4, False), (5, True)])
def test_mixed_epoch_continued_in_another_layout_reads_every_sample_once(shards: list[str], old, new, mix,
                                                                         batch: int, drop_last: bool) -> None:
    """Interleaved lanes (rule 3) are replayed from counts alone, also when data.mix_shards changes."""
    _check_continuation(shards, old, new, batch, drop_last, mix=mix)


@pytest.mark.parametrize("world, workers, mix", [(1, 2, 3), (2, 2, 4), (1, 0, 5)])
def test_mixed_resume_at_the_same_layout_is_exact(shards: list[str], world: int, workers: int, mix: int) -> None:
    full = _streams(shards, world, workers, 4, False, mix)
    whole = []
    for stream in full:
        stream.set_position(1)
        whole.append(_rank_batches(stream))
    for step in (1, 3, len(whole[0]) - 1):
        for rank, stream in enumerate(_streams(shards, world, workers, 4, False, mix)):
            stream.set_position(1, step)
            assert _rank_batches(stream) == whole[rank][step:]


def test_mixing_reads_each_sample_once_and_every_lane_in_each_batch(shards: list[str]) -> None:
    """An epoch at mix 4: each sample once (but the one 2 slots cannot share: as without mixing); each batch of a
    worker takes its samples round-robin from its 4 lanes, which lie in 4 different places of the epoch."""
    (stream,) = _streams(shards, 1, 2, 8, False, 4)
    keys = _read([stream], 0)
    plan = stream.plan(0)
    assert len(keys) == len(set(keys)) == sum(SIZES) - 1 and plan.left_out() == 1
    lanes = [plan.segments(lane) for lane in plan.lanes(0)]
    assert len({segments[0].shard for segments in lanes}) >= 3  # the lanes start in different shards
    first = _rank_batches(stream)[0]
    lane_of = {f"shard-{s.shard:02d}.tar/s{s.shard:02d}_{i:03d}": n for n, segments in enumerate(lanes)
               for s in segments for i in range(s.start, s.stop)}
    assert [lane_of[key] for key in first] == [0, 1, 2, 3] * 2


def test_a_second_change_of_layout_continues_the_remainder(shards: list[str]) -> None:
    """(2,2) stops at step 2, (1,0) at step 4 of the remainder, (3,1) reads the rest: still once each."""
    epoch, batch = 1, 4
    first, second, third = (_streams(shards, *layout, batch, False) for layout in ((2, 2), (1, 0), (3, 1)))
    whole = _read(first, epoch)
    done = _read(first, epoch, stop_at=2)
    history = (Layout(2, 2, batch, False, 2),)
    middle = _read(second, epoch, 0, history, stop_at=4)
    left_out = second[0].plan(epoch).left_out()
    rest = _read(third, epoch, 0, history + (Layout(1, 0, batch, False, 4),))
    left_out += third[0].plan(epoch).left_out()
    seen = done + middle + rest
    assert len(seen) == len(set(seen)) and set(seen) <= set(whole)
    assert (len(whole), len(done), len(middle), left_out) == (144, 16, 16, 1) and len(seen) == 144 - 1


def test_resume_inside_a_continued_epoch_at_its_layout_is_exact(shards: list[str]) -> None:
    history = (Layout(2, 1, 4, False, 3),)
    (full,), (resumed,) = _streams(shards, 1, 2, 4, False), _streams(shards, 1, 2, 4, False)
    full.set_position(2, 0, history)
    resumed.set_position(2, 5, history)
    assert _rank_batches(full)[5:] == _rank_batches(resumed)


def _cut_and_continue(digits_root: Path, out: Path, before: tuple[int, int, int], after: tuple[int, int, int],
                      kill_at: int, epochs: int) -> tuple[str, list[dict]]:
    """Train at (ranks, workers, accumulation) `before`, SIGKILLed right after the checkpoint of optimizer step
    `kill_at`; resume at `after`. Returns the resumed run's stdout and the metrics rows."""
    from tests.conftest import TINY, read_jsonl, run_cli

    args = ["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={out}", "run.name=el",
            *TINY, f"train.epochs={epochs}", f"checkpoint.every_steps={kill_at}"]
    (ranks, workers, accum), (ranks2, workers2, accum2) = before, after
    killed = run_cli([*args, f"data.num_workers={workers}", f"train.grad_accum_steps={accum}"], nproc=ranks,
                     check=False, env={"PIPELINE_KILL_AT_STEP": str(kill_at), "PIPELINE_KILL_AFTER_SAVE": "1"})
    assert killed.returncode != 0 and (out / f"el/checkpoints/step-{kill_at:08d}/COMPLETE").is_file()
    resumed = run_cli([*args, f"data.num_workers={workers2}", f"train.grad_accum_steps={accum2}"], nproc=ranks2)
    return resumed.stdout, read_jsonl(out / "el/metrics.jsonl")


@pytest.mark.slow  # two 2-rank runs and two 1-rank runs: about 2 minutes on a busy 2-core CPU
@pytest.mark.distributed
def test_preempted_runs_continue_their_epoch_with_another_number_of_ranks(digits_root: Path, tmp_path: Path) -> None:
    # 2 ranks x 2 workers: 4 slots of 314 of the 1257 samples, 20 steps per rank. Cut after step 6, each slot
    # had given 3 batches of 32: 1256 - 4 x 96 = 872 unread, 2 slots of 436 for 1 rank x 2 workers, 14 + 14
    # micro-batches, 14 optimizer steps with 2 accumulation steps: the epoch ends at step 6 + 14 = 20.
    out, rows = _cut_and_continue(digits_root, tmp_path / "2to1", (2, 2, 1), (1, 2, 2), kill_at=6, epochs=2)
    assert ("written at 2 rank(s) x 2 worker(s), batch 32, step 6; this run reads with 1 rank(s) x 2 worker(s), "
            "batch 32: continuing epoch 1 with the 872 sample(s) it left unread, 28 step(s) per rank") in out
    assert "0 sample(s) of the interrupted epoch are left out so every rank runs the same steps" in out
    # Every sample of the epoch once (data/train/seen sums every rank's inspected samples); then a full epoch.
    assert [(r["step"], r["data/train/seen"]) for r in rows] == [(20, 1256), (40, 1256)]
    # 1 rank, no workers, 2 accumulation steps: 40 micro-batches (the last of 9), cut after optimizer step 5 (320
    # samples). 937 unread over 2 ranks x 1 worker: 468 each, 1 left out; 15 steps per rank: the epoch ends at 20.
    out, rows = _cut_and_continue(digits_root, tmp_path / "1to2", (1, 0, 2), (2, 1, 1), kill_at=5, epochs=1)
    assert "continuing epoch 1 with the 937 sample(s) it left unread, 15 step(s) per rank" in out
    assert "1 sample(s) of the interrupted epoch are left out so every rank runs the same steps" in out
    assert [(r["step"], r["data/train/seen"]) for r in rows] == [(20, 320 + 936)]


class _Printer:
    world_size, is_main, device = 1, True, torch.device("cpu")

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, line: str) -> None:
        self.lines.append(line)


def _resume(stream: ShardStream, old_ranks: list[dict]) -> SimpleNamespace:
    """CheckpointManager.resume_epoch on a stand-in trainer: a checkpoint of 2 ranks x 2 workers, batch 4, at
    step 3."""
    from pipeline.checkpointing.manager import CheckpointManager
    from pipeline.data import SplitLoader
    from pipeline.data.loader_state import epoch_history
    from pipeline.training.state import TrainState

    trainer = SimpleNamespace(state=TrainState(epoch=1, global_step=3, step_in_epoch=3), dist=_Printer(),
                              train_data=SplitLoader(stream, None), epoch_totals=torch.zeros(3))
    manager = SimpleNamespace(loop=trainer, dist=trainer.dist, loader=trainer.train_data, sums=trainer.epoch_totals,
                              checkpointer=SimpleNamespace(rank_states=lambda folder: old_ranks))
    state = {"world_size": 2, "data_layout": {"world_size": 2, "workers": 2, "batch_size": 4, "drop_last": False,
                                              "step": 3, "history": []}}
    CheckpointManager.resume_epoch(manager, Path("unused"), state, None)
    trainer.epoch_history = epoch_history(stream, trainer.state.epoch)
    return trainer


def test_trainer_continues_the_epoch_and_rank_0_takes_over_the_old_sums(shards: list[str]) -> None:
    old_ranks = [{"epoch_totals": torch.tensor([3.0, 5.0, 12.0]), "data_faults": faults.empty_counts() + 12}
                 for _ in range(2)]
    (stream,) = _streams(shards, 1, 0, 4, False)
    trainer = _resume(stream, old_ranks)
    # 147 // 4 slots = 36 each; steps 3 = 2 batches of worker 0 + 1 of worker 1: 8 + 8 + 4 + 4 = 24 read.
    assert trainer.dist.lines == [
        "the checkpoint was written at 2 rank(s) x 2 worker(s), batch 4, step 3; this run reads with 1 rank(s) x "
        "0 worker(s), batch 4: continuing epoch 2 with the 120 sample(s) it left unread, 30 step(s) per rank",
        "0 sample(s) of the interrupted epoch are left out so every rank runs the same steps"]
    assert trainer.state.step_in_epoch == 0 and trainer.epoch_history == (Layout(2, 2, 4, False, 3),)
    assert trainer.epoch_totals.tolist() == [6.0, 10.0, 24.0] and trainer.train_data.bad_samples.total.tolist()[0] == 24


def test_balanced_sampling_restarts_the_epoch_with_the_reason(shards: list[str]) -> None:
    from pipeline.data.balance import BalancedShardStream

    stream = BalancedShardStream(shards, SIZES, batch_size=4, codec=KeyCodec(), channels=1, rank=0, world_size=1,
                                 num_workers=0, seed=3, train=True, num_classes=3, class_counts=[49, 49, 49])
    trainer = _resume(stream, [])
    assert trainer.dist.lines == [
        "the checkpoint was written at 2 rank(s) x 2 worker(s), batch 4, this run reads with 1 rank(s) x 0 "
        "worker(s), batch 4: restarting epoch 2 from its beginning (balanced sampling draws with replacement, so "
        "what was read is no set of samples)"]
    assert trainer.state.step_in_epoch == 0 and trainer.epoch_history == ()


@pytest.mark.parametrize("workers", [0, 2])  # 2: the default data.num_workers, with the default start method
def test_the_loader_counts_its_own_position_and_resumes_from_its_own_state(shards: list[str], workers: int) -> None:
    """The loader, not the training loop, knows where it stands: what it handed out (step), the next epoch once one
    is read; a new loader given only its saved state goes on with exactly the batches and counts left."""
    from pipeline.config.schema import DataConfig
    from pipeline.data import SplitLoader
    from pipeline.data.stream import make_loader

    def split() -> SplitLoader:
        (stream,) = _streams(shards, 1, workers, 4, False)
        return SplitLoader(stream, make_loader(stream, workers, False, DataConfig().worker_start))

    def keys(batches) -> list[str]:
        return [key for images, _ in batches for key in images]

    whole = split()
    assert whole.start_epoch(1) == 0
    planned = whole.stream.samples_per_epoch()  # 147, less what equal steps per worker leave out
    every = keys(whole.loader)
    assert len(every) == planned == 147 - (workers == 2)
    assert (whole.stream.epoch, whole.step) == (2, 0)  # read to its end: the loader stands at the next epoch
    assert whole.state_dict()["layout"]["epoch"] == 2 and whole.state_dict()["layout"]["step"] == 0

    cut = split()
    cut.start_epoch(1)
    batches = cut.loader
    first = keys(next(batches) for _ in range(5))
    state = cut.state_dict()
    assert cut.step == 5 and (state["layout"]["epoch"], state["layout"]["step"]) == (1, 5)

    resumed = split()  # the loop's position (epoch/step) is only the fallback for checkpoints without a layout
    went_on = resumed.load_state_dict({"layout": state["layout"], "world_size": 1, "epoch": 9, "step": 9},
                                      lambda every: [{faults_key(): state["faults"]}])
    assert went_on.step == 5 and resumed.start_epoch(1) == 0 and resumed.step == 5
    assert first + keys(resumed.loader) == every  # bit-exact: the same samples, once, in the same order
    assert torch.equal(resumed.bad_samples.total, whole.bad_samples.total)
    assert int(whole.bad_samples.total[0]) == planned


def faults_key() -> str:
    from pipeline.data.loader_state import FAULTS

    return FAULTS
