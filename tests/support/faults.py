"""Helpers of the fault tests (tests/training/test_nonfinite.py and test_random_kills.py,
tests/checkpointing/test_checkpoint_writes.py, tests/test_exits.py): the training command line, what it printed,
weights compared, a checkpointer on a run folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.checkpointing import Checkpointer
from pipeline.distributed import Dist
from tests.conftest import TINY

STEPS_PER_EPOCH = 20  # 1257 training images, batch 64, 1 rank x 2 workers (10 batches each)


def train_args(digits_root: Path, out: Path, name: str, *extra: str, workers: int = 0) -> list[str]:
    return ["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={out}", f"run.name={name}",
            *TINY, "train.batch_size=64", f"data.num_workers={workers}", *extra]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_checkpointer(run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir / "checkpoints", single_dist())


def single_dist() -> Dist:
    from accelerate import Accelerator

    return Dist(Accelerator(cpu=True))  # Accelerate's state is reset after each test (conftest)
