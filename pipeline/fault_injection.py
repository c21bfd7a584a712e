"""Test hooks that make a run fail on purpose, read from the environment once at import (zero cost otherwise).

- `PIPELINE_KILL_AT_STEP=N`: SIGKILL rank 0 right after optimizer step N (`PIPELINE_KILL_AFTER_SAVE=1`: only
  once that step's checkpoint is complete); `PIPELINE_KILL_RANK=R` picks another rank.
- `PIPELINE_RAISE_AT_STEP=N`: the main process raises an unexpected error (RuntimeError) after step N.
- `PIPELINE_WORKER_RAISE=N`: a training-data worker raises an unexpected error (RuntimeError) at its batch N.
"""

from __future__ import annotations

import os
import signal


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


KILL_AT_STEP = _int("PIPELINE_KILL_AT_STEP")
KILL_AFTER_SAVE = os.environ.get("PIPELINE_KILL_AFTER_SAVE") == "1"
KILL_RANK = _int("PIPELINE_KILL_RANK") or 0
RAISE_AT_STEP = _int("PIPELINE_RAISE_AT_STEP")
WORKER_RAISE = _int("PIPELINE_WORKER_RAISE")


def after_step(global_step: int, saved: bool, rank: int) -> None:
    """Called after every optimizer step (and epoch-end save)."""
    if KILL_AT_STEP == global_step and rank == KILL_RANK and (saved or not KILL_AFTER_SAVE):
        os.kill(os.getpid(), signal.SIGKILL)
    if RAISE_AT_STEP == global_step:
        raise RuntimeError(f"injected failure after step {global_step} (PIPELINE_RAISE_AT_STEP)")


def in_worker(batch: int, train: bool) -> None:
    """Called by a loader worker before each training batch it makes."""
    if WORKER_RAISE is not None and train and batch == WORKER_RAISE:
        raise RuntimeError(f"injected failure in a loader worker at its batch {batch} (PIPELINE_WORKER_RAISE)")
