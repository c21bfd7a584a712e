"""Checkpoints that cannot be written: a failed periodic save warns and keeps the previous one, a failed final save
exits 74, a really full disk and a read-only folder leave the earlier checkpoints whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.checkpointing import Checkpointer, verify
from pipeline.checkpointing.checkpointer import _tensor_bytes, model_state
from pipeline.exits import CheckpointWriteError
from tests.conftest import run_cli
from tests.support.faults import (
    STEPS_PER_EPOCH,
    error_lines,
    run_checkpointer,
    single_dist,
    train_args,
    warning_lines,
)


def test_failed_periodic_save_warns_keeps_previous_and_cleans_up(digits_root: Path, tmp_path: Path) -> None:
    # The save at step 8 fails (ENOSPC, after the weights file was written); the run is killed right after.
    killed = run_cli(train_args(digits_root, tmp_path, "d", "train.epochs=1", "checkpoint.every_steps=4"),
                     env={"PIPELINE_FAIL_SAVE_AT_STEP": "8", "PIPELINE_KILL_AT_STEP": "8"}, check=False)
    run = tmp_path / "d"
    assert killed.returncode == -9
    assert warning_lines(killed.stderr) == [
        f"warning: cannot write checkpoint '{run}/checkpoints/step-00000008': [Errno 28] No space left on device "
        f"(injected by PIPELINE_FAIL_SAVE_AT_STEP); kept {run}/checkpoints/step-00000004; training goes on and the "
        f"next save retries"]
    checkpointer = run_checkpointer(run)
    assert checkpointer.latest() == run / "checkpoints/step-00000004"
    assert (run / "checkpoints/last").resolve().name == "step-00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step-00000004"]  # no partial folder
    state = json.loads((run / "checkpoints/step-00000004/state.json").read_text())
    assert state["train"]["global_step"] == 4 and verify(run / "checkpoints/step-00000004") is None
    assert load_file(str(run / "checkpoints/step-00000004/model.safetensors"))  # loadable weights
    # Without the kill, the same failure is only a warning: the run finishes and later saves succeed.
    done = run_cli(train_args(digits_root, tmp_path, "d2", "train.epochs=1", "checkpoint.every_steps=4"),
                   env={"PIPELINE_FAIL_SAVE_AT_STEP": "8"})
    assert len(warning_lines(done.stderr)) == 1 and (tmp_path / "d2/test_metrics.json").is_file()
    assert run_checkpointer(tmp_path / "d2").latest() == tmp_path / "d2/checkpoints/step-00000020"


def test_failed_final_save_exits_74(digits_root: Path, tmp_path: Path) -> None:
    result = run_cli(train_args(digits_root, tmp_path, "f", "train.epochs=2"),
                     env={"PIPELINE_FAIL_SAVE_AT_STEP": str(2 * STEPS_PER_EPOCH)}, check=False)
    run = tmp_path / "f"
    assert result.returncode == 74
    assert error_lines(result.stderr) == [
        f"error: cannot write checkpoint '{run}/checkpoints/best': [Errno 28] No space left on device (injected by "
        f"PIPELINE_FAIL_SAVE_AT_STEP); this was the run's last save: it resumes from "
        f"{run}/checkpoints/step-00000020 (free space and rerun the same command)"]
    assert run_checkpointer(run).latest() == run / "checkpoints/step-00000020"
    assert not (run / "test_metrics.json").exists()


def _tiny_training_state():
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, optimizer, scheduler


def _save(checkpointer: Checkpointer, step: int, model, optimizer, scheduler):
    return checkpointer.save(Checkpointer.step_name(step), model, optimizer, scheduler, None,
                             {"train": {"global_step": step}}, {"rng": torch.zeros(3)})


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs), when this machine lets us mount one (root in a container usually can)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        gone = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
        if gone.returncode != 0:  # something still holds it: detach it now, the kernel frees it when released
            subprocess.run(["umount", "-l", str(mount)], check=False)
            print(f"umount {mount}: {gone.stderr.strip()}")


def test_real_full_disk_keeps_previous_checkpoint(small_disk: Path) -> None:
    checkpointer = Checkpointer(small_disk / "checkpoints", single_dist(), keep_last=2)
    model, optimizer, scheduler = _tiny_training_state()
    first = _save(checkpointer, 1, model, optimizer, scheduler)
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for half a checkpoint
    with pytest.raises(CheckpointWriteError) as info:
        _save(checkpointer, 2, model, optimizer, scheduler)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint '{small_disk}/checkpoints/step-00000002': [Errno 28] No space "
                              f"left on device") and "\n" not in message
    assert checkpointer.latest() == first and verify(first) is None
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["last", "step-00000001"]
    # The size check passes (just) but the files, rounded up to whole pages, do not fit: the write itself fails.
    (small_disk / "filler").unlink()
    needed = _tensor_bytes(model_state(model)) + _tensor_bytes(optimizer.state_dict())
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - needed - 3 * 4096))  # the rank file takes one page first
    with pytest.raises(CheckpointWriteError) as info:
        _save(checkpointer, 3, model, optimizer, scheduler)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint '{small_disk}/checkpoints/step-00000003': [Errno 28] No "
                              f"space left on device")
    assert "the checkpoint needs about" not in message and "\n" not in message  # not the early refusal
    assert checkpointer.latest() == first and verify(first) is None
    assert sorted(p.name for p in checkpointer.directory.iterdir()) == ["last", "step-00000001"]
    fresh, fresh_opt, fresh_sched = _tiny_training_state()
    checkpointer.load(first, fresh, fresh_opt, fresh_sched, None)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (the ENOSPC tests cover this path)")
def test_read_only_checkpoint_folder(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path / "checkpoints", single_dist())
    model, optimizer, scheduler = _tiny_training_state()
    first = _save(checkpointer, 1, model, optimizer, scheduler)
    checkpointer.directory.chmod(0o555)
    try:
        with pytest.raises(CheckpointWriteError, match="Permission denied"):
            _save(checkpointer, 2, model, optimizer, scheduler)
    finally:
        checkpointer.directory.chmod(0o755)
    assert checkpointer.latest() == first
