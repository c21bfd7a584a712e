"""Shared fixtures: the digits shards (built once per session) and a CLI runner."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A tiny, fast configuration for end-to-end runs (seconds on one CPU core).
TINY = ["model.channels=[8,16]", "data.image_size=8", "train.batch_size=32", "logging.wandb_mode=disabled",
        "logging.progress=false", "model.dropout=0.1"]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from pipeline.data.writer.shards import ensure_digits_shards

    root = tmp_path_factory.mktemp("digits") / "shards"
    ensure_digits_shards(root)
    return root


@pytest.fixture(scope="session")
def tiny_digits_root(tmp_path_factory) -> Path:
    """128 training, 32 validation and 32 test digits (8x8 grayscale PNGs, 10 classes) as our shards: for tests whose
    models cost seconds per step (timm's)."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.writer.subsets import write_split_shards

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)

    def sample(i: int) -> tuple[dict[str, bytes], int]:
        buffer = io.BytesIO()
        Image.fromarray(pixels[i], mode="L").save(buffer, format="PNG")
        return {"png": buffer.getvalue()}, int(digits.target[i])

    order = np.random.default_rng(0).permutation(len(pixels))
    bounds = {"train": (0, 128), "val": (128, 160), "test": (160, 192)}
    root = tmp_path_factory.mktemp("tiny_digits") / "shards"
    write_split_shards(root, [str(c) for c in range(10)],
                       {split: [sample(i) for i in order[lo:hi]] for split, (lo, hi) in bounds.items()}, "digits")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` (or under `accelerate launch` with `nproc` CPU ranks)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "pipeline", *args]
    else:
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--main_process_port", str(free_port()), "-m", "pipeline", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}\n"
                             f"STDERR:\n{result.stderr[-3000:]}")
    return result


def run_main(args: list[str]) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in this process (`pipeline.commands.cli.main`, from the repository root as `run_cli`): what a
    refusal case costs without an interpreter's start and torch's import (seconds). For the cases of a refusal
    family whose first case runs as a real process; never for signals, exit paths or faults, which need their own
    process (and the default workers). stdout and stderr are what main printed; torch's thread count is restored."""
    import contextlib
    import io

    import torch

    from pipeline.commands.cli import main

    stdout, stderr, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(args)
            except SystemExit as exc:  # argparse's refusals
                code = exc.code
    finally:
        torch.set_num_threads(threads)  # (the run sets its own: train.cpu_threads)
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def read_jsonl(path: Path, drop: tuple[str, ...] = ("epoch_seconds", "images_per_second")) -> list[dict]:
    """metrics.jsonl without wall-clock fields (which differ between any two runs)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in drop and k != "images_per_second"} for row in rows]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests that build an Accelerator in-process (with different precisions) must not inherit one another's:
    Accelerate keeps one state per process and refuses a different mixed_precision afterwards."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
