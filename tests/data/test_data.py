"""Shards, manifest and the resumable stream: exact counts, determinism, exact-once evaluation."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import Manifest, build_loader
from pipeline.data.plan import epoch_shard_order, slot_segments
from pipeline.data.writer.digits import write_digits_imagefolder
from pipeline.data.writer.shards import write_shards
from tests.support.processes import proc_stat


def _cfg(root: Path, *overrides: str):
    return load_config(None, [f"data.root={root}", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]",
                              "data.image_size=8", *overrides])


def test_digits_manifest_counts_and_hashes(digits_root: Path) -> None:
    manifest = Manifest.read(digits_root)
    assert manifest.classes == [str(i) for i in range(10)]
    counts = {name: split.num_samples for name, split in manifest.splits.items()}
    assert counts == {"train": 1257, "val": 270, "test": 270}
    for split in manifest.splits.values():
        assert sum(s.num_samples for s in split.shards) == split.num_samples
        assert sum(split.class_counts.values()) == split.num_samples
        assert all(s.num_samples <= 64 for s in split.shards)
        for shard in split.shards:
            data = (digits_root / shard.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.num_bytes
            with tarfile.open(digits_root / shard.name) as tar:
                assert len([m for m in tar.getmembers() if m.name.endswith(".png")]) == shard.num_samples
    # Stratified: every class's share of the test split is within one sample of its share overall.
    totals = {c: sum(s.class_counts[c] for s in manifest.splits.values()) for c in manifest.classes}
    for c in manifest.classes:
        assert abs(manifest.splits["test"].class_counts[c] - totals[c] * 0.15) <= 1


def test_imagefolder_and_csv_sources_with_byte_limit(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    assert write_digits_imagefolder(folder) == 1797
    manifest = write_shards(folder, tmp_path / "shards", max_samples=10_000, max_bytes=20_000, show_progress=False)
    assert all(s.num_bytes <= 20_000 + 5_000 + 10_240 for s in manifest.splits["train"].shards)  # + 1 sample + end
    assert len(manifest.splits["train"].shards) > 1
    rows = ["path,label"] + [f"images/{p.parent.name}/{p.name},{'even' if int(p.parent.name) % 2 == 0 else 'odd'}"
                             for p in sorted(folder.rglob("*.png"))[:200]]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    from_csv = write_shards(tmp_path / "list.csv", tmp_path / "csv_shards", max_samples=50, show_progress=False)
    assert from_csv.classes == ["even", "odd"]
    assert sum(s.num_samples for s in from_csv.splits.values()) == 200


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 1), (2, 2), (3, 2)])
def test_training_ranks_get_equal_steps_and_disjoint_samples(digits_root: Path, world: int, workers: int) -> None:
    cfg = _cfg(digits_root, f"data.num_workers={workers}", "train.batch_size=32")
    manifest = Manifest.read(digits_root)
    steps, seen = [], []
    for rank in range(world):
        split = build_loader(cfg, manifest, "train", rank, world, train=True)
        split.set_position(epoch=1)
        batches = list(split.loader)
        assert len(batches) == split.stream.steps_per_epoch()
        steps.append(len(batches))
        seen.append(sum(len(labels) for _, labels in batches))
    assert len(set(steps)) == 1
    slots = world * max(1, workers)
    assert sum(seen) == 1257 // slots * slots  # at most slots-1 samples left out, different ones each epoch


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_evaluation_counts_every_sample_exactly_once(digits_root: Path, world: int, workers: int) -> None:
    cfg = _cfg(digits_root, f"data.num_workers={workers}", "train.eval_batch_size=50")
    manifest = Manifest.read(digits_root)
    labels = []
    for rank in range(world):
        split = build_loader(cfg, manifest, "val", rank, world, train=False)
        split.set_position(0)
        labels.extend(int(label) for _, batch in split.loader for label in batch)
    assert len(labels) == manifest.splits["val"].num_samples == 270
    # Per-class counts equal the manifest's: nothing duplicated to pad a rank, nothing dropped.
    counts = {name: labels.count(index) for index, name in enumerate(manifest.classes)}
    assert counts == manifest.splits["val"].class_counts


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    assert epoch_shard_order(20, 0, 3, True) == epoch_shard_order(20, 0, 3, True)
    assert epoch_shard_order(20, 0, 3, True) != epoch_shard_order(20, 0, 4, True)
    assert epoch_shard_order(5, 0, 3, False) == [0, 1, 2, 3, 4]
    segments = slot_segments([10, 10, 10], [2, 0, 1], 5, 25)
    assert [(s.shard, s.start, s.stop) for s in segments] == [(2, 5, 10), (0, 0, 10), (1, 0, 5)]


@pytest.mark.parametrize("workers, start", [(0, 7), (2, 7), (2, 8), (3, 10)])
def test_restart_at_any_step_reproduces_the_remaining_batches(digits_root: Path, workers: int, start: int) -> None:
    cfg = _cfg(digits_root, f"data.num_workers={workers}", "train.batch_size=32", "data.augment.rotation=15")
    manifest = Manifest.read(digits_root)
    full = build_loader(cfg, manifest, "train", 0, 1, train=True)
    full.set_position(2, 0)
    reference = list(full.loader)
    resumed = build_loader(cfg, manifest, "train", 0, 1, train=True)
    resumed.set_position(2, start)
    rest = list(resumed.loader)
    assert len(rest) == len(reference) - start
    for (a, la), (b, lb) in zip(reference[start:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_grayscale_digits_convert_to_rgb(digits_root: Path) -> None:
    cfg = load_config(None, [f"data.root={digits_root}", "data.image_size=8", "data.num_workers=0",
                             "data.mean=[0.5]", "data.std=[0.5]"])
    split = build_loader(cfg, Manifest.read(digits_root), "test", 0, 1, train=False)
    split.set_position(0)
    images, labels = next(iter(split.loader))
    assert images.shape[1:] == (3, 8, 8) and labels.dtype == torch.long
    assert torch.equal(images[:, 0], images[:, 1])  # gray replicated to RGB


def _parent_pid(pid: int) -> int:
    return int(proc_stat(pid)[1])


def test_workers_start_from_a_forkserver_and_give_the_batches_fork_and_spawn_give(digits_root: Path) -> None:
    """By default the workers are forked from a single-threaded server, never from the main process (whose
    W&B, pin-memory and progress threads may hold a lock at the moment of a fork); the batches do not change."""
    manifest = Manifest.read(digits_root)
    epochs, parents = {}, {}
    for method in ("forkserver", "fork", "spawn"):
        cfg = _cfg(digits_root, "data.num_workers=2", "train.batch_size=32", "data.augment.rotation=15",
                   f"data.worker_start={method}")
        split = build_loader(cfg, manifest, "train", 0, 1, train=True)
        split.set_position(1, 3)
        epochs[method] = list(split.loader)
        workers = split.dataloader._iterator._workers  # persistent: still alive after the epoch
        parents[method] = {_parent_pid(w.pid) for w in workers}
        assert len(workers) == 2
    assert load_config(None, []).data.worker_start == "forkserver"
    assert parents["fork"] == parents["spawn"] == {os.getpid()}
    (server,) = parents["forkserver"]
    assert server != os.getpid() and _parent_pid(server) == os.getpid()
    assert len(epochs["fork"]) == len(epochs["spawn"]) == len(epochs["forkserver"]) > 10
    for (a, la), (b, lb), (c, lc) in zip(epochs["forkserver"], epochs["fork"], epochs["spawn"]):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(la, lb) and torch.equal(la, lc)


def test_loader_processes_ignore_stop_signals_and_end_when_the_main_process_is_killed(digits_root: Path,
                                                                                     tmp_path: Path) -> None:
    """Stop signals sent to the workers, their server and the resource tracker end none of them (the main
    process decides); a forkserver's workers are not children of the main process, so DataLoader's own
    parent check cannot see it die: `init_worker` must end them (and then the server) after a SIGKILL."""
    script = f"""
import os, signal, time
from pipeline.config import load_config
from pipeline.data import Manifest, build_loader
cfg = load_config(None, ["data.root={digits_root}", "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]",
                         "data.image_size=8", "data.num_workers=2"])
split = build_loader(cfg, Manifest.read("{digits_root}"), "train", 0, 1, train=True)
split.set_position(0)
next(iter(split.loader))
workers = [w.pid for w in split.dataloader._iterator._workers]
server = int(open(f"/proc/{{workers[0]}}/stat").read().rsplit(")", 1)[1].split()[1])
print(server, *workers, flush=True)
from multiprocessing import resource_tracker
helpers = [server, *workers, resource_tracker._resource_tracker._pid]
for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    for pid in helpers:  # as a scheduler signals every process of a job: the main process decides
        os.kill(pid, signum)
time.sleep(6)  # more than DataLoader's 5 s check of the parent
assert [p for p in helpers if open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"] == []
assert len(list(split.loader)) > 10  # the rest of the epoch
os.kill(os.getpid(), signal.SIGKILL)
"""
    out, err = tmp_path / "out", tmp_path / "err"  # not pipes: surviving workers would hold them open (a hang)
    with out.open("w") as stdout, err.open("w") as stderr:
        done = subprocess.run([sys.executable, "-c", script], stdout=stdout, stderr=stderr, timeout=120)
    assert done.returncode == -signal.SIGKILL, err.read_text()
    server, *workers = [int(pid) for pid in out.read_text().split()]
    assert len(workers) == 2 and server not in (1, os.getpid(), *workers)  # the forkserver
    deadline = time.monotonic() + 20
    while any(proc_stat(pid)[0] != "Z" for pid in (*workers, server)):
        assert time.monotonic() < deadline, f"workers {workers} or their server {server} outlived the main process"
        time.sleep(0.1)
