"""Non-finite losses and weights during training: skip, halt and stop (exit 70), on one rank and two; the fault
hooks that inject them (pipeline.testing.faults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.checkpointing import verify
from pipeline.config import load_config
from pipeline.testing.faults import parse_steps
from tests.conftest import ROOT, TINY, free_port, read_jsonl, run_cli
from tests.support.faults import (
    STEPS_PER_EPOCH,
    error_lines,
    run_checkpointer,
    train_args,
    warning_lines,
)


def test_parse_steps() -> None:
    assert parse_steps("5") == {5} and parse_steps("5, 9") == {5, 9} and parse_steps("3-5,8") == {3, 4, 5, 8}
    assert parse_steps("") == set()


def test_skip_counts_warns_and_continues(digits_root: Path, tmp_path: Path) -> None:
    result = run_cli(train_args(digits_root, tmp_path, "skip", "train.epochs=2"),
                     env={"PIPELINE_NAN_AT_STEP": "5,11-12"})
    warnings = warning_lines(result.stderr)
    assert warnings == [
        "warning: non-finite loss and gradients at step 5 (epoch 1): update skipped (1 in a row; the run stops at 10)",
        "warning: non-finite loss and gradients at step 11 (epoch 1): update skipped (1 in a row; the run stops at 10)",
        "warning: non-finite loss and gradients at step 12 (epoch 1): update skipped (2 in a row; the run stops at 10)",
    ]
    assert "epoch 1: 3 update(s) skipped for non-finite loss/gradients, 0 by the fp16 GradScaler" in result.stdout
    rows = read_jsonl(tmp_path / "skip/metrics.jsonl")
    assert [r["nonfinite/skipped_steps"] for r in rows] == [3, 0]
    assert [r["nonfinite/scaler_skipped_steps"] for r in rows] == [0, 0]
    assert [r["step"] for r in rows] == [20, 40]  # skipped updates are still steps of the data stream
    assert all(isinstance(r["train/loss"], float) for r in rows)  # NaN batches are counted, not averaged in
    weights = load_file(str(tmp_path / "skip/checkpoints/last/model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_skipped_steps_leave_no_trace(digits_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step NaN: weights, BatchNorm statistics, optimizer state and lr schedule end exactly where they began."""
    from pipeline.commands.train import build_run

    monkeypatch.setenv("PIPELINE_NAN_AT_STEP", f"1-{STEPS_PER_EPOCH}")
    cfg = load_config("configs/default.yaml", [f"data.root={digits_root}", f"run.output_dir={tmp_path}", "run.name=n",
                                               *TINY, "train.batch_size=64", "data.num_workers=0", "train.epochs=1",
                                               "train.max_nonfinite_steps=100", "logging.training_signals=false"])
    run = build_run(cfg)
    before = {k: v.clone() for k, v in run.trainer.unwrapped.state_dict().items()}
    lr_before = [g["lr"] for g in run.trainer.optimizer.param_groups]
    state = run.trainer.fit()
    after = run.trainer.unwrapped.state_dict()
    assert state.global_step == STEPS_PER_EPOCH
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. running_mean/var, num_batches_tracked
    assert run.trainer.optimizer.state_dict()["state"] == {}  # never stepped: no Adam moments
    assert [g["lr"] for g in run.trainer.optimizer.param_groups] == lr_before  # schedule not advanced
    assert read_jsonl(tmp_path / "n/metrics.jsonl")[0]["nonfinite/skipped_steps"] == STEPS_PER_EPOCH


def test_halt_writes_diagnostics_and_keeps_last_good_checkpoint(digits_root: Path, tmp_path: Path) -> None:
    result = run_cli(train_args(digits_root, tmp_path, "halt", "train.epochs=1", "train.nonfinite=halt",
                           "checkpoint.every_steps=4", "train.max_grad_norm=1.0"),
                     env={"PIPELINE_NAN_AT_STEP": "7"}, check=False)
    run = tmp_path / "halt"
    assert result.returncode == 70
    assert error_lines(result.stderr) == [
        f"error: non-finite loss and gradients at step 7 (epoch 1; train.nonfinite=halt): stopped without updating "
        f"the weights; details in {run}/nonfinite.json; last good checkpoint: {run}/checkpoints/step-00000004 (lower "
        f"optim.lr, set train.max_grad_norm, or check the data, then rerun the same command to resume)"]
    assert "Traceback" not in result.stderr
    record = json.loads((run / "nonfinite.json").read_text())
    assert (record["step"], record["epoch"], record["policy"], record["grad_norm"]) == (7, 1, "halt", "nan")
    assert record["last_good_checkpoint"] == str(run / "checkpoints/step-00000004")
    assert "head.2.weight" in record["nonfinite_grads"]  # measured before clipping turned everything NaN
    (rank,) = record["ranks"]
    assert rank["losses"] == ["nan"] and rank["batches"][0]["step_in_epoch"] == 6
    assert len(rank["batches"][0]["sample_keys"]) == 64
    checkpointer = run_checkpointer(run)
    assert checkpointer.latest() == run / "checkpoints/step-00000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step-00000004"]
    assert verify(run / "checkpoints/step-00000004") is None


@pytest.mark.distributed
def test_nan_on_one_rank_two_ranks_agree(digits_root: Path, tmp_path: Path) -> None:
    """Only rank 1's loss is NaN and every gradient stays finite: rank 0 must still skip / halt with it."""
    env = {"PIPELINE_NAN_AT_STEP": "3", "PIPELINE_NAN_RANK": "1", "PIPELINE_NAN_GRADS": "0"}
    skipped = run_cli(train_args(digits_root, tmp_path, "skip2", "train.epochs=1"), nproc=2, env=env, timeout=240)
    assert warning_lines(skipped.stderr) == [
        "warning: non-finite loss at step 3 (epoch 1): update skipped (1 in a row; the run stops at 10)"]
    assert read_jsonl(tmp_path / "skip2/metrics.jsonl")[0]["nonfinite/skipped_steps"] == 1  # rank 0's record
    # Through our launcher, which keeps the ranks' exit code (torchrun would turn it into 1).
    halted = subprocess.run([sys.executable, "-m", "pipeline.distributed.launch", "--multi_gpu", "--num_processes", "2",
                             "--main_process_port", str(free_port()), "-m", "pipeline",
                             *train_args(digits_root, tmp_path, "halt2", "train.epochs=1", "train.nonfinite=halt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env})
    assert halted.returncode == 70, halted.stderr[-3000:]
    assert len(error_lines(halted.stderr)) == 1  # said once (by rank 0), although both ranks stopped
    record = json.loads((tmp_path / "halt2/nonfinite.json").read_text())
    losses = {r["rank"]: r["losses"] for r in record["ranks"]}
    assert losses[1] == ["nan"] and isinstance(losses[0][0], float)  # rank 0 halted on rank 1's word
    assert record["nonfinite"] == "loss" and record["nonfinite_grads"] == []


def test_launcher_reports_the_failing_rank_not_the_one_it_terminated() -> None:
    from types import SimpleNamespace

    from pipeline.distributed.launch import exit_code_of

    failure = lambda code: SimpleNamespace(exitcode=code)  # noqa: E731
    assert exit_code_of({0: failure(-15), 1: failure(70)}) == 70  # rank 0 was SIGTERMed by torchrun while exiting
    assert exit_code_of({0: failure(-15)}) == 143


def test_consecutive_nonfinite_steps_stop_the_run(digits_root: Path, tmp_path: Path) -> None:
    result = run_cli(train_args(digits_root, tmp_path, "many", "train.epochs=1", "train.max_nonfinite_steps=3"),
                     env={"PIPELINE_NAN_AT_STEP": "4-20"}, check=False)
    assert result.returncode == 70
    assert len(warning_lines(result.stderr)) == 2
    (error,) = error_lines(result.stderr)
    assert error.startswith("error: non-finite loss and gradients at step 6 (epoch 1; 3 steps in a row, "
                            "train.max_nonfinite_steps=3): stopped without updating the weights")
    assert json.loads((tmp_path / "many/nonfinite.json").read_text())["in_a_row"] == 3


@pytest.mark.parametrize("unscaled", [True, False])
def test_skip_closes_the_fp16_grad_scaler_iteration(unscaled: bool) -> None:
    """fp16 (no GPU here, so GradScaler on the CPU): a skipped update must leave the scaler ready for the next step."""
    from pipeline.training.nonfinite import reset_scaler

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    if unscaled:
        scaler.unscale_(optimizer)  # what clip_grad_norm_ does before measuring
    reset_scaler(scaler)
    optimizer.zero_grad()
    assert scaler.get_scale() == 1024.0  # a NaN loss is not an overflow of the scale: unchanged
    before = model.weight.detach().clone()
    scaler.scale(model(torch.ones(2, 3)).sum()).backward()
    scaler.unscale_(optimizer)  # would raise "unscale_() has already been called" without the reset
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(before, model.weight)


def test_batch_sample_keys_name_the_batch(digits_root: Path) -> None:
    """The keys in nonfinite.json are the samples the loader really put in that batch (labels match in order)."""
    import tarfile

    from pipeline.data import Manifest, build_stream

    cfg = load_config(None, [f"data.root={digits_root}", "data.num_workers=2", "train.batch_size=50",
                             "data.channels=1", "data.mean=[0.5]", "data.std=[0.5]", "data.image_size=8"])
    manifest = Manifest.read(digits_root)
    stream = build_stream(cfg, manifest, "train", 0, 1, train=True)
    labels: dict[str, int] = {}
    for shard in manifest.split("train").shards:
        with tarfile.open(digits_root / shard.name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    labels[f"{shard.name}/{member.name[:-4]}"] = int(tar.extractfile(member).read())
    stream.set_position(epoch=1, step=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    for step, (_, batch_labels, _) in enumerate(loader):
        if step in (0, 3, 7, 12):
            keys = stream.batch_sample_keys(1, step)
            assert [labels[k] for k in keys] == batch_labels.tolist()
