"""Every way a run ends, with the loader workers users get by default: the documented exit code, in seconds,
and no process of the run left behind (checked by PID: ranks, loader workers, forkserver, resource tracker).

Each case is a real `pipeline train` (or the 2-rank launcher) in a subprocess. The processes of the run are
collected while it runs (every descendant of the command, whatever session it moved to), and each must be
gone shortly after the command exits.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, free_port
from tests.support.faults import run_checkpointer
from tests.support.faulty_shards import faulty_samples, write_set
from tests.support.processes import Ended, descendants, live_stat, run_watched

STEPS_PER_EPOCH = 20  # digits: 1257 training images, batch 64 (0 or 2 workers alike)
EXIT_WITHIN_S = 10.0  # from the run's last message (or the first signal) to the command's exit, one rank
EXIT_WITHIN_2_RANKS_S = 30.0


@pytest.fixture(scope="module")
def faulty_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faulty") / "shards"
    write_set(root, faulty_samples())
    return root


@dataclass(frozen=True)
class Case:
    code: int
    line: str  # the start of the last line on stderr
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()


CASES = {
    "bad data (65)": Case(65, "error: data.max_bad_fraction=0.05 exceeded: 5 of 40 training samples",
                          args=("train.batch_size=4", "data.max_bad_fraction=0.05")),
    "non-finite (70)": Case(70, "error: non-finite loss and gradients at step 3", env=(("PIPELINE_NAN_AT_STEP", "3"),),
                            args=("train.nonfinite=halt",)),
    "final save fails (74)": Case(74, "error: cannot write checkpoint",
                                  env=(("PIPELINE_FAIL_SAVE_AT_STEP", str(STEPS_PER_EPOCH)),)),
    "exception in a worker (1)": Case(1, "RuntimeError: injected failure in a loader worker at its batch 2",
                                      env=(("PIPELINE_WORKER_RAISE", "2"),)),
    "exception in the main process (1)": Case(1, "RuntimeError: injected failure after step 3",
                                              env=(("PIPELINE_RAISE_AT_STEP", "3"),)),
    "SIGINT (130)": Case(130, "interrupted (SIGINT): checkpoint saved at step", signals=("SIGINT",)),
    "SIGINT twice (130)": Case(130, "interrupted ", signals=("SIGINT", "SIGINT")),  # saved, or: "interrupted again"
    "SIGTERM twice (75)": Case(75, "stop requested (SIGTERM): checkpoint saved at step",
                               signals=("SIGTERM", "SIGTERM")),
    "SIGUSR1 twice (75)": Case(75, "stop requested (SIGUSR1): checkpoint saved at step",
                               signals=("SIGUSR1", "SIGUSR1")),
}
SIGNAL_CASES = [name for name, case in CASES.items() if case.signals]


def _train_args(case: Case, out: Path, workers: int, digits_root: Path, faulty_root: Path) -> list[str]:
    root = faulty_root if case.code == 65 else digits_root
    epochs = 30 if case.signals else 1  # a signal must find the run still training
    return ["train", "configs/default.yaml", f"data.root={root}", f"run.output_dir={out}", "run.name=r", *TINY,
            "train.batch_size=64", f"train.epochs={epochs}", f"data.num_workers={workers}", *case.args]


def _check(case: Case, ended: Ended, workers: int, within_s: float, ranks: int = 1) -> None:
    report = (f"exit {ended.code} after {ended.seconds:.1f} s\nSTDOUT:\n{ended.stdout[-2000:]}\n"
              f"STDERR:\n{ended.stderr[-3000:]}")
    assert ended.code == case.code, report
    assert ended.seconds <= within_s, report
    # ranks, and per rank with workers: 2 workers, the forkserver, the resource tracker
    assert len(ended.pids) >= (ranks - (ranks == 1)) + ranks * (4 if workers else 0), (ended.pids, report)
    assert ended.left == [], f"processes left: {ended.left}\n{report}"
    assert "KeyboardInterrupt" not in ended.stderr, report
    lines = [line for line in (ended.stdout + ended.stderr).splitlines()
             if re.sub(r"^\[rank\d+\]: ", "", line).startswith(case.line)]  # 2 ranks: torchrun's prefix
    assert lines, report
    print(f"\nexit-table | {case.code} | {ranks} rank(s) | {workers} workers | {ended.seconds:.1f} s | "
          f"{len(ended.pids)} processes, {len(ended.left)} left | {lines[-1][:90]}")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_every_exit_ends_in_seconds_with_its_code_and_leaves_no_process(name: str, workers: int, digits_root: Path,
                                                                        faulty_root: Path, tmp_path: Path) -> None:
    case = CASES[name]
    cmd = [sys.executable, "-m", "pipeline", *_train_args(case, tmp_path / "runs", workers, digits_root, faulty_root)]
    ended = run_watched(cmd, tmp_path, env=dict(case.env), signals=case.signals, message=case.line)
    _check(case, ended, workers, EXIT_WITHIN_S)
    if case.code in (75, 130) and case.line.endswith("saved at step"):  # a handled stop: its checkpoint is complete
        checkpoint = run_checkpointer(tmp_path / "runs/r").latest()
        assert checkpoint is not None and (tmp_path / "runs/r/PREEMPTED").is_file()
    if case.code == 1:  # an unexpected error keeps its traceback, for the bug report
        assert "Traceback (most recent call last)" in ended.stderr


TWO_RANK_CASES = ["non-finite (70)", "exception in a worker (1)", "SIGTERM twice (75)",
                  # the same launcher forwarding and rank agreement as the three above; ~50 s each: slow
                  *(pytest.param(name, marks=pytest.mark.slow) for name in
                    ("exception in the main process (1)", "SIGINT (130)", "SIGINT twice (130)", "SIGUSR1 twice (75)"))]


@pytest.mark.distributed
# Default workers (2) in the regular suite; 0 workers with 2 ranks is `slow` (the 1-rank matrix runs both always).
@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), 2])
@pytest.mark.parametrize("name", TWO_RANK_CASES)
def test_two_ranks_end_in_seconds_with_the_ranks_code(name: str, workers: int, digits_root: Path, faulty_root: Path,
                                                      tmp_path: Path) -> None:
    """Through `pipeline.distributed.launch` (what launch.sh runs), signals sent to the launcher as Ctrl-C or a
    scheduler would: it forwards them, and repeated ones change nothing."""
    case = CASES[name]
    cmd = [sys.executable, "-m", "pipeline.distributed.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "pipeline",
           *_train_args(case, tmp_path / "runs", workers, digits_root, faulty_root)]
    ended = run_watched(cmd, tmp_path, env={**dict(case.env), "ACCELERATE_USE_CPU": "1"}, signals=case.signals,
                        message=case.line)
    _check(case, ended, workers, EXIT_WITHIN_2_RANKS_S, ranks=2)


@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_with_one_line_naming_it(digits_root: Path, tmp_path: Path) -> None:
    """kill -9 of rank 1 mid-epoch: rank 0 says it lost a rank (one line, no gloo traceback) and the launcher
    names the killed rank and exits with its code (137), within 60 s, leaving no process."""
    cmd = [sys.executable, "-m", "pipeline.distributed.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "pipeline",
           *_train_args(Case(0, ""), tmp_path / "runs", 2, digits_root, digits_root), "train.epochs=3"]
    env = {"ACCELERATE_USE_CPU": "1", "PIPELINE_KILL_AT_STEP": "5", "PIPELINE_KILL_RANK": "1"}
    ended = run_watched(cmd, tmp_path, env=env, message="lost contact")
    report = f"exit {ended.code}\n{ended.stderr[-3000:]}"
    assert ended.code == 137 and ended.seconds <= 60, report
    assert ended.left == [] and len(ended.pids) >= 10, (ended.pids, ended.left, report)
    errors = [line for line in ended.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: lost contact with another of the 2 ranks"), report
    assert "launch: rank 1 was killed by SIGKILL; the job ends with exit code 137" in ended.stderr, report
    assert "Traceback" not in ended.stderr, report


@pytest.mark.distributed
def test_a_rank_that_never_joins_is_an_error_line_within_the_init_timeout(tmp_path: Path) -> None:
    """A process group that cannot form (here: rank 1 of 2 never starts) ends with one line and exit 76 after
    dist.init_timeout_s, instead of torch's silent 30-minute wait."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "pipeline", "train", *TINY, f"run.output_dir={tmp_path}", "dist.init_timeout_s=3"]
    started = time.monotonic()
    ended = run_watched(cmd, tmp_path, env=env, message="error:", timeout_s=120)
    assert ended.code == 76, ended.stderr
    assert time.monotonic() - started < 60
    assert ended.stderr.strip().splitlines()[-1].startswith(
        "error: rank 0: the 2 ranks did not all join the process group at 127.0.0.1:"), ended.stderr
    assert ended.left == []


# ---- stuck loader workers (data.worker_timeout_s) -------------------------------------------------------------

WORKER_TIMEOUT_S = 5.0  # small for the test; the default is 600 s (docs/configuration.md)


def _children(pid: int) -> list[int]:
    """Live children of `pid`, oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = live_stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append((int(fields[19]), int(entry.name)))  # field 22 of stat: start time
    return [child for _, child in sorted(found)]


def loader_workers(main_pid: int) -> list[int]:
    """The loader workers of a run, oldest first (the training loader's come first): the children of the
    forkserver that `main_pid` started."""
    servers = [pid for pid in _children(main_pid)
               if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return [worker for server in servers for worker in _children(server)]


def test_a_stopped_loader_worker_ends_the_run_with_one_line_naming_it(digits_root: Path, tmp_path: Path) -> None:
    """SIGSTOP one training worker (default workers, forkserver) of a 1-rank run: within data.worker_timeout_s and
    seconds more the run ends with 76 and one line naming the worker, its shard and position, and leaves no
    process (the stopped worker included); the last complete checkpoint stays."""
    case = Case(76, "error: loader worker ", args=(f"data.worker_timeout_s={WORKER_TIMEOUT_S:g}",),
                signals=("SIGSTOP",))
    cmd = [sys.executable, "-m", "pipeline", *_train_args(case, tmp_path / "runs", 2, digits_root, digits_root)]
    ended = run_watched(cmd, tmp_path, signals=case.signals, target=lambda pid: loader_workers(pid)[:1])
    # The main process first uses the batches the other worker (and the stopped one) had already delivered.
    _check(case, ended, 2, WORKER_TIMEOUT_S + 2 * EXIT_WITHIN_S)
    (line,) = [line for line in ended.stderr.splitlines() if line.startswith("error:")]
    assert re.match(r"error: loader worker [01] \(pid \d+\) delivered no training batch for 5 s "
                    r"\(data.worker_timeout_s\); it was reading shard '.*/train-\d{6}\.tar' at sample \d+\. The last "
                    r"complete checkpoint is kept: rerun the same command", line), line
    assert "Traceback" not in ended.stderr
    checkpoint = run_checkpointer(tmp_path / "runs/r").latest()  # the end of epoch 1, complete
    assert checkpoint is not None and checkpoint.name.startswith("step-")


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_stopped_after_the_last_epoch_do_not_hold_the_exit(workers: int, digits_root: Path,
                                                                   tmp_path: Path) -> None:
    """The training workers stopped (SIGSTOP) once the last epoch's line is out: validation is done, the test
    split is read by its own workers, and the run must still exit 0 in seconds with no process left (it used
    to park for ever in an atexit poll: SIGTERM, which a worker ignores, then join)."""
    case = Case(0, "epoch 1/1", signals=("SIGSTOP",))
    cmd = [sys.executable, "-m", "pipeline",
           *_train_args(case, tmp_path / "runs", workers, digits_root, digits_root), "train.epochs=1"]
    ended = run_watched(cmd, tmp_path, signals=case.signals if workers else (), trigger="epoch 1/1",
                        target=lambda pid: loader_workers(pid)[:2], last_output="AUROC")  # the test table's end
    if workers:
        _check(case, ended, workers, EXIT_WITHIN_S)
    assert ended.code == 0 and (tmp_path / "runs/r/test_metrics.json").is_file(), ended.stderr[-3000:]
    assert ended.seconds <= EXIT_WITHIN_S and ended.left == [], (ended.seconds, ended.left)
    print(f"\nstopped after the last epoch | {workers} workers | exit {ended.code} {ended.seconds:.1f} s after the "
          f"test table | {len(ended.pids)} processes, {len(ended.left)} left")


# ---- loaders outside `pipeline train` -------------------------------------------------------------------------

LOADER_SCRIPT = """
import os, sys, time
import torch
from pipeline.config import load_config
from pipeline.data import Manifest, SplitLoader, build_stream
from pipeline.data.stream import make_loader
from pipeline.data.workers import worker_context


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return torch.tensor([index])


def main(root, workers, wait):
    # As benchmarks/loader_throughput.py does: our loaders, and a plain DataLoader in our worker context.
    cfg = load_config(None, [f"data.root={root}", "data.image_size=8", *([f"data.num_workers={workers}"]
                                                                        if workers != "default" else [])])
    manifest = Manifest.read(root)
    splits = []
    for split, train in (("train", True), ("val", False)):
        stream = build_stream(cfg, manifest, split, 0, 1, train=train)
        loader = make_loader(stream, cfg.data.num_workers, False, cfg.data.worker_start)
        splits.append(SplitLoader(stream, loader))
    count = cfg.data.num_workers
    plain = torch.utils.data.DataLoader(
        Numbers(), batch_size=8, num_workers=count, persistent_workers=count > 0, prefetch_factor=4 if count else None,
        multiprocessing_context=worker_context(cfg.data.worker_start) if count else None)
    batches = [iter(split.loader) for split in splits] + [iter(plain)]
    for batch in batches:  # half-read, as a script that fails midway leaves them
        next(batch)
        next(batch)
    print("iterated", flush=True)
    print("iterated", file=sys.stderr, flush=True)
    if wait:
        time.sleep(600)
    raise RuntimeError("the script fails")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "wait")
"""


def _loader_script(tmp_path: Path, root: Path, workers: str, wait: bool) -> list[str]:
    script = tmp_path / "loaders.py"
    script.write_text(LOADER_SCRIPT)
    return [sys.executable, str(script), str(root), workers, "wait" if wait else "raise"]


@pytest.mark.parametrize("workers", ["0", "default"])
def test_a_script_that_raises_with_loaders_alive_exits_and_leaves_no_process(workers: str, digits_root: Path,
                                                                            tmp_path: Path) -> None:
    """A script that half-reads our loaders and a plain DataLoader in `worker_context` and then raises: the
    traceback, exit 1 within 10 s of the raise, and no worker, forkserver or resource tracker left."""
    ended = run_watched(_loader_script(tmp_path, digits_root, workers, wait=False), tmp_path, message="iterated",
                        env={"PYTHONPATH": str(ROOT)})
    report = f"exit {ended.code} after {ended.seconds:.1f} s\n{ended.stderr[-3000:]}"
    assert ended.code == 1 and ended.seconds <= 10.0, report
    assert ended.stderr.strip().splitlines()[-1] == "RuntimeError: the script fails", report
    assert "Traceback (most recent call last)" in ended.stderr
    if workers == "default":  # 3 loaders x 2 workers, the forkserver, the resource tracker
        assert len(ended.pids) >= 1 + 3 * 2 + 2, (ended.pids, report)
    assert ended.left == [], f"processes left: {ended.left}\n{report}"
    print(f"\nscript raises | {workers} workers | exit {ended.code} after {ended.seconds:.1f} s | "
          f"{len(ended.pids)} processes, {len(ended.left)} left")


@pytest.mark.parametrize("workers", ["0", "default"])
def test_a_killed_script_leaves_no_worker_or_forkserver(workers: str, digits_root: Path, tmp_path: Path) -> None:
    """SIGKILL of a script that holds loaders: its workers and forkserver (which ignore SIGTERM) are gone within
    5 s, as they watch the process that owns them."""
    ended = run_watched(_loader_script(tmp_path, digits_root, workers, wait=True), tmp_path, trigger="iterated",
                        signals=("SIGKILL",), env={"PYTHONPATH": str(ROOT)}, gone_within_s=5.0)
    report = f"exit {ended.code}\n{ended.stderr[-3000:]}"
    assert ended.code == -signal.SIGKILL, report
    if workers == "default":
        assert len(ended.pids) >= 1 + 3 * 2 + 2, (ended.pids, report)
    assert ended.left == [], f"processes left 5 s after the SIGKILL: {ended.left}\n{report}"
    print(f"\nscript killed | {workers} workers | {len(ended.pids)} processes, {len(ended.left)} left after 5 s")


# ---- a rank stuck under a collective (dist.timeout_s), under each launcher --------------------------------------

def _rank_processes(launcher_pid: int, rank: int) -> list[int]:
    """The process of `rank` among the launcher's descendants (read from its RANK variable)."""
    found = []
    for pid in descendants(launcher_pid, set()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"-m\0pipeline" in Path(f"/proc/{pid}/cmdline").read_bytes():
            found.append(pid)
    return found[:1]


LAUNCHERS = {
    "pipeline.distributed.launch": ["-m", "pipeline.distributed.launch", "--multi_gpu", "--num_processes", "2",
                                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    "accelerate launch": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
}


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", [  # the two that end in 1 (torchrun's agent) are slow: ~40 s each, same path
    "pipeline.distributed.launch", *(pytest.param(name, marks=pytest.mark.slow) for name in LAUNCHERS
                                     if name != "pipeline.distributed.launch")])
def test_a_rank_stuck_under_a_collective_ends_the_job_with_76(launcher: str, digits_root: Path,
                                                              tmp_path: Path) -> None:
    """SIGSTOP rank 1 mid-training (default workers): rank 0 waits dist.timeout_s in its next collective, then says
    so in one line and exits 76. `pipeline.distributed.launch` (launch.sh) returns 76, not the 137 of the stopped
    rank that torchrun kills afterwards; plain `accelerate launch` and torchrun turn every failure into 1 and
    report the ranks' own codes (rank 0: 76)."""
    port = ["--main_process_port", str(free_port())] if launcher != "torchrun" else [f"--master_port={free_port()}"]
    cmd = [sys.executable, *LAUNCHERS[launcher], *port, "-m", "pipeline",
           *_train_args(Case(76, "", signals=("SIGSTOP",)), tmp_path / "runs", 2, digits_root, digits_root),
           "dist.timeout_s=10"]
    ended = run_watched(cmd, tmp_path, env={"ACCELERATE_USE_CPU": "1"}, signals=("SIGSTOP",),
                        target=lambda pid: _rank_processes(pid, 1), timeout_s=300)
    report = f"exit {ended.code} after {ended.seconds:.1f} s\nSTDERR:\n{ended.stderr[-4000:]}"
    errors = [re.sub(r"^\[rank\d+\]: ", "", line) for line in ended.stderr.splitlines()
              if re.sub(r"^\[rank\d+\]: ", "", line).startswith("error:")]
    assert errors and errors[0].startswith("error: rank 0: a collective waited longer than dist.timeout_s"), report
    if launcher == "pipeline.distributed.launch":
        assert ended.code == 76, report
        assert "launch: rank 0 exited with code 76 after waiting longer than its timeout" in ended.stderr, report
        assert "Traceback" not in ended.stderr, report
    else:  # torchrun's agent exits 1 for any failed rank (with its own traceback); its summary has the ranks' codes
        assert ended.code == 1 and re.search(r"Root Cause.*\n(.*\n)*?\s*rank\s*: 0 .*\n\s*exitcode\s*: 76",
                                             ended.stderr), report
        assert ended.stderr.count("Traceback (most recent call last)") == 1, report  # the launcher's, no rank's
    assert ended.seconds <= 10 + 30 + 30, report  # dist.timeout_s, torchrun's 30 s before SIGKILL, slack
    assert ended.left == [], f"processes left: {ended.left}\n{report}"
    print(f"\nstuck collective | {launcher} | exit {ended.code} after {ended.seconds:.1f} s | "
          f"{len(ended.pids)} processes, {len(ended.left)} left | {errors[0][:80]}")
