"""Two real CPU ranks (gloo) under `accelerate launch`: equal steps, exact-once evaluation,
exact resume after SIGKILL at several points, torn checkpoints, and signal-driven preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, free_port, read_jsonl, run_cli

pytestmark = pytest.mark.distributed


def _args(digits_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={out}", f"run.name={name}",
            *TINY, *extra]


def _same(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(digits_root: Path, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank x 2-worker run; the other tests compare against it."""
    out = tmp_path_factory.mktemp("ref")
    run_cli(_args(digits_root, out, "ref", "train.epochs=3", "data.num_workers=2", "checkpoint.every_steps=4"),
            nproc=2)
    return out / "ref"


def test_two_ranks_equal_steps_and_exact_once_evaluation(reference: Path) -> None:
    rows = read_jsonl(reference / "metrics.jsonl")
    # 1257 samples over 2 ranks x 2 workers = 314 per slot -> 10 batches of 32 per worker -> 20 steps per rank.
    assert [r["step"] for r in rows] == [20, 40, 60]
    metrics = json.loads((reference / "test_metrics.json").read_text())
    assert metrics["num_samples"] == 270 == sum(map(sum, metrics["confusion_matrix"]))
    assert rows[-1]["val/num_samples"] == 270


# Mid-epoch between saves (step 6); the slow case adds right after a save (step 28) and mid-epoch in the last epoch
# (step 51), each on the run resumed from the kill before (~50 s more on 2 cores).
@pytest.mark.parametrize("kills", [((6, "0"),), pytest.param(((6, "0"), (28, "1"), (51, "0")), marks=pytest.mark.slow)],
                         ids=["one", "three"])
def test_sigkill_then_resume_is_bit_identical(kills: tuple, digits_root: Path, tmp_path: Path,
                                              reference: Path) -> None:
    args = _args(digits_root, tmp_path, "cut", "train.epochs=3", "data.num_workers=2", "checkpoint.every_steps=4")
    for step, after_save in kills:
        killed = run_cli(args, nproc=2, check=False,
                         env={"PIPELINE_KILL_AT_STEP": str(step), "PIPELINE_KILL_AFTER_SAVE": after_save})
        assert killed.returncode != 0
    run_cli(args, nproc=2)
    assert _same(reference / "checkpoints/best/model.safetensors", tmp_path / "cut/checkpoints/best/model.safetensors")
    last = sorted((tmp_path / "cut/checkpoints").glob("step-*"))[-1]
    assert _same(sorted((reference / "checkpoints").glob("step-*"))[-1] / "model.safetensors",
                 last / "model.safetensors")
    assert read_jsonl(reference / "metrics.jsonl") == read_jsonl(tmp_path / "cut/metrics.jsonl")
    assert (reference / "test_metrics.json").read_text() == (tmp_path / "cut/test_metrics.json").read_text()


def test_torn_newest_checkpoint_falls_back_to_previous(digits_root: Path, tmp_path: Path) -> None:
    args = _args(digits_root, tmp_path, "torn", "train.epochs=1", "data.num_workers=0", "checkpoint.every_steps=10",
                 "checkpoint.keep_last=3")
    run_cli(args, env={"PIPELINE_KILL_AT_STEP": "30", "PIPELINE_KILL_AFTER_SAVE": "1"}, check=False)
    folders = sorted((tmp_path / "torn/checkpoints").glob("step-*"))
    assert [f.name for f in folders] == ["step-00000010", "step-00000020", "step-00000030"]
    weights = folders[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncate the newest
    resumed = run_cli([*args, "train.epochs=1"])
    assert "skipping checkpoint" in resumed.stderr and "step-00000030" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000020" in resumed.stdout


# The default workers in the suite; with 0 workers (slow) SIGUSR1's exit is in tests/test_exits.py's matrix, resume's
# bit-exactness in the SIGKILL tests.
@pytest.mark.parametrize("workers, whole_group", [pytest.param(0, False, marks=pytest.mark.slow), (2, True)])
def test_sigusr1_checkpoints_and_exits_75_then_resumes(digits_root: Path, tmp_path: Path, workers: int,
                                                       whole_group: bool) -> None:
    """`whole_group`: the signal reaches the loader workers too, as when SLURM signals every process of a job
    step; they must ignore it and keep serving the main process until it has saved its checkpoint."""
    args = _args(digits_root, tmp_path, "sig", "train.epochs=2", f"data.num_workers={workers}")
    run_cli(_args(digits_root, tmp_path, "sigref", "train.epochs=2", f"data.num_workers={workers}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while not log.is_file() and time.time() < deadline:  # wait for epoch 1 to finish: now mid-epoch 2
        time.sleep(0.05)
    if whole_group:
        os.killpg(proc.pid, signal.SIGUSR1)
    else:
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    marker = tmp_path / "sig" / "PREEMPTED"
    assert marker.is_file() and "stop requested (SIGUSR1)" in out
    step = int(marker.read_text())
    assert (tmp_path / "sig/checkpoints" / f"step-{step:08d}" / "COMPLETE").is_file()
    run_cli(args)
    assert not marker.exists()
    assert _same(tmp_path / "sigref/checkpoints/best/model.safetensors",
                 tmp_path / "sig/checkpoints/best/model.safetensors")
    assert read_jsonl(tmp_path / "sigref/metrics.jsonl") == read_jsonl(tmp_path / "sig/metrics.jsonl")


AGREE_SCRIPT = '''
import json, os, sys
import torch
import torch.distributed as distributed
from pipeline.distributed import build_dist

dist = build_dist()
calls = []
original = distributed.all_reduce
def spy(tensor, *args, group=None, **kwargs):
    calls.append({"device": tensor.device.type, "host_group": group is dist.host_group,
                  "backend": distributed.get_backend(group)})
    return original(tensor, *args, group=group, **kwargs)
distributed.all_reduce = spy
answers = [dist.agree([dist.rank == 0, False, dist.rank == 1]), dist.any(False), dist.any(dist.rank == 1)]
with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as out:
    json.dump({"answers": answers, "calls": calls}, out)
distributed.destroy_process_group()
'''


def test_ranks_agree_on_host_flags_over_a_gloo_group_with_cpu_tensors(tmp_path: Path) -> None:
    """Stop requests and save errors are agreed on over a gloo group with CPU tensors: under NCCL this never
    waits for the GPU's queued work (a device tensor would mean a full host sync at every checked step)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(script), str(tmp_path)], cwd=ROOT, env=env, check=True, timeout=120,
                   capture_output=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["answers"] == [[True, False, True], False, True]
        assert result["calls"] == [{"device": "cpu", "host_group": True, "backend": "gloo"}] * 3
