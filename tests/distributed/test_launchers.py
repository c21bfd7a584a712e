"""Launchers end to end: 2 "machines" on localhost, and a real SLURM job preempted mid-epoch and requeued.

Both must end with exactly the weights and test metrics of an uninterrupted 2-process run on one machine (CPU).
The SLURM test needs a running cluster: tests/services/start_slurm.sh starts a one-node one on localhost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipeline.distributed.launch import exit_code_of
from pipeline.exits import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
# Tiny but real: 3 epochs of ~20 optimizer steps per rank, periodic checkpoints, no W&B, no loader workers.
TINY = ["model.channels=[8,16]", "data.image_size=8", "train.epochs=3", "train.batch_size=32", "data.num_workers=0",
        "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.every_steps=5"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RANK", None)
    return env


def _overrides(data_root: Path, output_dir: Path, name: str) -> list[str]:
    return ["configs/default.yaml", *TINY, f"data.root={data_root}", "data.auto_prepare_digits=true",
            f"run.output_dir={output_dir}", f"run.name={name}"]


def _launcher(*launch_args: str) -> list[str]:
    """Our launcher (accelerate launch's arguments, signals forwarded, exit code kept) on 2 CPU processes."""
    return [sys.executable, "-m", "pipeline.distributed.launch", "--multi_gpu", "--num_processes", "2",
            *launch_args, "-m", "pipeline", "train"]


def assert_same_result(run_dir: Path, reference: Path) -> None:
    """Bit-identical best weights and identical test metrics."""
    weights = load_file(run_dir / "checkpoints/best/model.safetensors")
    expected = load_file(reference / "checkpoints/best/model.safetensors")
    assert weights.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different}"
    assert json.loads((run_dir / "test_metrics.json").read_text()) == \
        json.loads((reference / "test_metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """An uninterrupted run: accelerate launch, 2 CPU processes on one machine."""
    base = tmp_path_factory.mktemp("launchers")
    data_root, output_dir = base / "shards", base / "runs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()), "-m", "pipeline", "train",
           *_overrides(data_root, output_dir, "reference")]
    done = subprocess.run(cmd, cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return SimpleNamespace(data_root=data_root, output_dir=output_dir, run_dir=output_dir / "reference")


def test_exit_code_of_prefers_preemption() -> None:
    failure = lambda code: SimpleNamespace(exitcode=code)  # noqa: E731
    assert exit_code_of({0: failure(1), 1: failure(EXIT_PREEMPTED)}) == EXIT_PREEMPTED
    assert exit_code_of({1: failure(-9), 0: failure(3)}) == 3
    assert exit_code_of({0: failure(-9)}) == 137


def test_exit_code_of_a_timeout_is_76_not_the_stuck_rank_torchrun_killed() -> None:
    """Rank 0 waited over dist.timeout_s for the stopped rank 1 (and said so: `report_timeout`), then torchrun
    killed rank 1: 76. Without that report the same codes mean rank 1 died first (the OOM killer): 137."""
    failure = lambda code: SimpleNamespace(exitcode=code)  # noqa: E731
    assert exit_code_of({0: failure(76), 1: failure(-9)}, timed_out={0}) == 76
    assert exit_code_of({0: failure(76), 1: failure(-15)}, timed_out={0}) == 76
    assert exit_code_of({0: failure(76), 1: failure(-9)}) == 137


def _machine_command(how: str, rank: int, port: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Machine `rank` of 2 on localhost: our accelerate-launch wrapper, or launch.sh as srun starts it per node."""
    if how == "accelerate":
        return [*_launcher("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                           "--main_process_port", port), *overrides], _cpu_env()
    slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": str(rank),
                 "SLURM_JOB_NODELIST": "localhost", "NPROC": "1", "MAIN_PORT": port, "PIPELINE_PYTHON": sys.executable}
    return ["./launch.sh", *overrides], _cpu_env(**slurm_env)


@pytest.mark.distributed
@pytest.mark.parametrize("how", [pytest.param("accelerate", marks=pytest.mark.slow), "launch.sh-in-slurm"])
def test_two_machines_on_localhost_equal_one_machine(reference: SimpleNamespace, how: str) -> None:
    if how == "launch.sh-in-slurm" and shutil.which("scontrol") is None:
        pytest.skip("launch.sh finds the main node with `scontrol show hostnames`; SLURM is not installed")
    port, name = str(_free_port()), f"two_machines_{how}"
    overrides = _overrides(reference.data_root, reference.output_dir, name)
    procs = []
    for rank in (0, 1):
        cmd, env = _machine_command(how, rank, port, overrides)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"machine {rank}:\n{output[-3000:]}"
    assert "2 process(es)" in outputs[0]  # one world of two ranks, not two single-process runs
    assert_same_result(reference.output_dir / name, reference.run_dir)


def _job_field(job_id: str, field: str) -> str | None:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    match = re.search(rf"\b{field}=(\S+)", shown.stdout)
    return match.group(1) if match else None


def _newest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[-1]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[-1].isdigit()]
    return max(steps, default=0)


def _wait(what: str, condition, deadline: float, log: Path) -> None:
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log.exists() else "(no log)"
            pytest.fail(f"timed out waiting for {what}; job log:\n{tail}")
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("sbatch") is None,
                    reason="SLURM is not installed (apt-get install slurm-wlm munge; tests/services/start_slurm.sh)")
def test_slurm_preempted_job_requeues_and_equals_uninterrupted_run(reference: SimpleNamespace) -> None:
    up = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    assert up.returncode == 0 and re.search(r"idle|mix", up.stdout), \
        f"no idle SLURM node ({up.stdout.strip()}{up.stderr.strip()}); start one: tests/services/start_slurm.sh"
    run_dir, log = reference.output_dir / "slurm", reference.output_dir / "slurm.log"
    submit = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
              "--job-name=pipeline-test", f"--output={log}", f"--chdir={ROOT}", "slurm/train.sbatch",
              *_overrides(reference.data_root, reference.output_dir, "slurm")]
    started = time.monotonic()
    deadline = started + 200
    submitted = subprocess.run(submit, cwd=ROOT, env=_cpu_env(NPROC="2", PIPELINE_PYTHON=sys.executable),
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        # Mid-epoch: once the periodic checkpoint at step 25 exists the signal lands a few steps into epoch 2 of 3.
        _wait("a checkpoint inside the second epoch", lambda: _newest_step(run_dir) >= 25, deadline, log)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # every process of the job's steps
        _wait("the requeue", lambda: _job_field(job_id, "Restarts") not in (None, "0"), deadline, log)
        # A requeued job is held back about two minutes before it may start again; let it start now.
        _wait("the requeued job to be pending", lambda: _job_field(job_id, "JobState") == "PENDING", deadline, log)
        # Not at once: slurmd refuses a credential issued in the same second the old one was revoked
        # ("Job credential revoked"). Two seconds later, StartTime=now also makes it schedule at once
        # (a future StartTime would wait for the scheduler's next pass, up to a minute).
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        _wait("the job to finish",
              lambda: _job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), deadline, log)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    print(f"SLURM job {job_id}: submitted to finished in {time.monotonic() - started:.1f} s")
    text = log.read_text()
    assert _job_field(job_id, "JobState") == "COMPLETED", text[-4000:]
    preempted = re.search(r"PREEMPTED \(step (\d+)\): requeueing", text)
    assert preempted, f"the job was not preempted and requeued:\n{text[-4000:]}"
    steps_per_epoch = int(re.search(r"(\d+) steps/epoch/rank", text).group(1))
    assert int(preempted.group(1)) % steps_per_epoch != 0, "the stop was meant to land mid-epoch"
    assert f"training exited with {EXIT_PREEMPTED}" in text
    assert "(restart 1)" in text and "(restart 2)" not in text
    assert not (run_dir / "PREEMPTED").exists()
    assert_same_result(run_dir, reference.run_dir)
