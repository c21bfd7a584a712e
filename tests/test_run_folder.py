"""The run folder's guards: one run per folder, resume only with the config that made the weights, defensive reads.

End-to-end through the CLI on the tiny digits config (data.num_workers=0: failing runs must not wait on workers).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

EPOCHS = 2


def base_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, f"data.root={root}", f"run.output_dir={out}", "data.num_workers=0",
            f"train.epochs={EPOCHS}", *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under `folder`."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            files[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def finished(digits_root: Path, tmp_path_factory) -> Path:
    """The output folder of one finished 2-epoch run (`digits`); tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished")
    run_cli(base_args(digits_root, out))
    return out


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out, symlinks=True)
    return out


def epochs_of(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_start_records_config_history_and_run_info(finished: Path) -> None:
    run_dir = finished / "digits"
    assert not (run_dir / ".run.lock").exists()  # released at the end
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert history == [{**history[0], "resumed_from": None, "changes": [], "allowed": [], "forced": []}]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["host"] == socket.gethostname() and info["world_size"] == 1 and info["argv"][1] == "train"
    assert set(info["versions"]) == {"torch", "torchvision", "accelerate", "webdataset", "pipeline"}
    assert all(info["versions"][p] for p in ("torch", "torchvision", "accelerate", "webdataset"))
    assert len(info["git_commit"]) == 40 and isinstance(info["git_dirty"], bool)
    for step in (run_dir / "checkpoints").glob("step-*"):
        assert (step / "config.yaml").read_bytes() == (run_dir / "config.yaml").read_bytes()
        assert "config.yaml" in json.loads((step / "COMPLETE").read_text())["files"]


def test_second_run_on_a_held_folder_refuses_and_the_first_finishes_clean(digits_root: Path, tmp_path: Path) -> None:
    epochs = 30  # long enough for the second run to start while the first trains
    args = base_args(digits_root, tmp_path, f"train.epochs={epochs}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    lock = tmp_path / "digits" / ".run.lock"
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.exists(), "the first run never took the lock"
        second = run_cli(args, check=False, timeout=120)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2
    lines = error_lines(second)
    assert len(lines) == 1 and f"in use by pid {first.pid} on {socket.gethostname()} since " in lines[0], lines
    assert "run folder" not in second.stdout  # refused before the model and loaders were built
    assert first.returncode == 0, err[-2000:]
    assert epochs_of(tmp_path / "digits") == list(range(1, epochs + 1))
    assert not lock.exists()


def test_a_lock_held_by_a_live_process_refuses(digits_root: Path, copy: Path) -> None:
    run_dir = copy / "digits"
    before = snapshot(run_dir)
    held = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01T00:00:00+00:00",
            "heartbeat": time.time()}
    (run_dir / ".run.lock").write_text(json.dumps(held))
    result = run_cli(base_args(digits_root, copy, "train.epochs=3"), check=False, timeout=120)
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: run folder '{run_dir}' is in use by pid {os.getpid()} on {socket.gethostname()} since "
        f"2026-01-01T00:00:00+00:00 (lock {run_dir / '.run.lock'}); wait for it, or choose another run.name"]
    (run_dir / ".run.lock").unlink()
    assert snapshot(run_dir) == before


def test_a_stale_lock_of_a_dead_process_is_taken_over(digits_root: Path, copy: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    run_dir = copy / "digits"
    (run_dir / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                   "since": "2026-01-01T00:00:00+00:00", "heartbeat": time.time()}))
    result = run_cli(base_args(digits_root, copy, "train.epochs=3"), timeout=120)
    assert f"taking over the stale lock '{run_dir / '.run.lock'}' of pid {gone.pid}" in result.stderr
    assert "its process is gone" in result.stderr
    assert epochs_of(run_dir) == [1, 2, 3]
    assert not (run_dir / ".run.lock").exists()


def test_resume_with_harmless_changes_is_allowed_and_recorded(digits_root: Path, finished: Path, copy: Path) -> None:
    extra = ["train.epochs=3", "checkpoint.keep_last=3", "logging.training_signals=false", "train.log_every_steps=5"]
    result = run_cli(base_args(digits_root, copy, *extra), timeout=120)
    run_dir = copy / "digits"
    moved = f"run.output_dir '{finished}' -> '{copy}'"  # a copied (moved) run folder
    assert f"resuming with changed settings: checkpoint.keep_last 2 -> 3, logging.training_signals True -> False, " \
           f"{moved}, train.epochs 2 -> 3, train.log_every_steps 20 -> 5\n" in result.stdout
    history = [json.loads(line) for line in (run_dir / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["resumed_from"].endswith("checkpoints/step-00000080")
    assert history[1]["allowed"] == ["checkpoint.keep_last", "logging.training_signals", "run.output_dir",
                                     "train.epochs", "train.log_every_steps"] and history[1]["forced"] == []
    assert ["train.epochs", 2, 3] in history[1]["changes"]
    assert epochs_of(run_dir) == [1, 2, 3]
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("override, named", [
    ("train.batch_size=16", "train.batch_size 32 -> 16"),
    ("model.channels=[8,32]", "model.channels [8, 16] -> [8, 32]"),
    ("optim.lr=0.01", "optim.lr 0.001 -> 0.01"),
    ("train.epochs=1", "train.epochs 2 -> 1"),
    ("data.root", "data.root '"),
])
def test_resume_with_trajectory_changes_is_refused_and_leaves_the_folder_as_it_was(
        digits_root: Path, copy: Path, tmp_path: Path, override: str, named: str) -> None:
    if override == "data.root":
        other = tmp_path / "other_shards"
        shutil.copytree(digits_root, other)
        override, named = f"data.root={other}", f"data.root '{digits_root}' -> '{other}'"
    run_dir = copy / "digits"
    before = snapshot(run_dir)
    result = run_cli([*base_args(digits_root, copy), override], check=False, timeout=120)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and named in lines[0], lines
    assert lines[0].startswith(f"error: cannot resume {run_dir / 'checkpoints' / 'step-00000080'}: ")
    assert "another run.name" in lines[0] and "checkpoint.resume_changes=allow" in lines[0]
    assert snapshot(run_dir) == before  # config.yaml, history, checkpoints: byte for byte


def test_resume_changes_allow_resumes_and_records_the_forced_keys(digits_root: Path, copy: Path) -> None:
    result = run_cli(base_args(digits_root, copy, "train.batch_size=16", "train.epochs=3",
                               "checkpoint.resume_changes=allow"), timeout=120)
    assert "resuming despite changes (checkpoint.resume_changes=allow): train.batch_size 32 -> 16" in result.stderr
    run_dir = copy / "digits"
    history = json.loads((run_dir / "config_history.jsonl").read_text().splitlines()[-1])
    assert history["forced"] == ["train.batch_size"]
    assert history["allowed"] == ["checkpoint.resume_changes", "run.output_dir", "train.epochs"]
    assert epochs_of(run_dir) == [1, 2, 3]


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(digits_root: Path, copy: Path) -> None:
    metrics = copy / "digits" / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"epoch": 3, "step": 12')  # what a kill during an append leaves
    result = run_cli(base_args(digits_root, copy, "train.epochs=3"), timeout=120)
    assert f"{metrics}:3: dropping a torn last line" in result.stderr
    assert epochs_of(copy / "digits") == [1, 2, 3]


def test_garbage_inside_metrics_is_one_line_naming_file_and_line(digits_root: Path, copy: Path) -> None:
    metrics = copy / "digits" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json at all", *lines[1:]]) + "\n")
    result = run_cli(base_args(digits_root, copy, "train.epochs=3"), check=False, timeout=120)
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: {metrics}:2 is not a JSON record"), errors
    assert not (copy / "digits" / ".run.lock").exists()


def test_an_explicit_resume_of_a_corrupted_checkpoint_is_refused(digits_root: Path, copy: Path) -> None:
    run_dir = copy / "digits"
    folder = run_dir / "checkpoints" / "step-00000080"
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    before = snapshot(run_dir)
    result = run_cli(base_args(digits_root, copy, "train.epochs=3", f"checkpoint.resume={folder}"), check=False,
                     timeout=120)
    assert result.returncode == 2
    assert error_lines(result) == [f"error: checkpoint.resume='{folder}' cannot be loaded: model.safetensors has "
                                   f"100 bytes, expected {size}; "
                                   f"give a complete checkpoint folder or checkpoint.resume=auto"]
    assert snapshot(run_dir) == before


def test_ranks_may_trade_for_accumulation_steps_but_the_global_batch_may_not_change() -> None:
    from pipeline.training.run_folder import GLOBAL_WINDOW, config_changes, is_harmless

    old = {"train": {"grad_accum_steps": 1, "batch_size": 32}, "logging": {"progress": True}}
    traded = {"train": {"grad_accum_steps": 2, "batch_size": 32}, "logging": {"progress": False}}
    assert config_changes(old, traded, 2, 1) == [("logging.progress", True, False)]
    changes = config_changes(old, traded, 1, 1)
    assert changes == [("logging.progress", True, False), ("train.grad_accum_steps", 1, 2), (GLOBAL_WINDOW, 1, 2)]
    assert [k for k, a, b in changes if not is_harmless(k, a, b)] == ["train.grad_accum_steps", GLOBAL_WINDOW]
    assert config_changes(old, old, 2, 4) == [(GLOBAL_WINDOW, 2, 4)]
    assert not is_harmless("train.epochs", 3, 2) and is_harmless("train.epochs", 2, 3)
    assert not is_harmless("data.augment.hflip", 0.0, 0.5) and not is_harmless("some.future_key", 1, 2)
