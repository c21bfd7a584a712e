"""Fault injection: every test hook that makes a run fail on purpose, in one place.

Production code calls the named hooks below at fixed points. The environment is read once, at import (the NaN
hook: when a run's non-finite guard is built, so an in-process test can set it), so a hook with no fault set is
a check of a module constant, or no call at all.

| variable | hook (its caller) | effect |
|---|---|---|
| `PIPELINE_KILL_AT_STEP=N` | `after_step` (trainer) | SIGKILL rank `PIPELINE_KILL_RANK` right after optimizer step N |
| `PIPELINE_KILL_AFTER_SAVE=1` | `after_step` | ... only once that step's checkpoint is complete |
| `PIPELINE_KILL_RANK=R` | `after_step` | the rank `PIPELINE_KILL_AT_STEP` kills (default 0) |
| `PIPELINE_RAISE_AT_STEP=N` | `after_step` | the main process raises a RuntimeError after step N |
| `PIPELINE_WORKER_RAISE=N` | `in_worker` (data stream) | a training-data worker raises a RuntimeError at its batch N |
| `PIPELINE_NAN_AT_STEP=5` | `nan_injection` (non-finite guard) | the loss of step 5's micro-batches times NaN |
| | | (its gradients are NaN too); also `5,9` or `5-8` |
| `PIPELINE_NAN_RANK=R` | `nan_injection` | ... on rank R only |
| `PIPELINE_NAN_GRADS=0` | `nan_injection` | add the NaN instead: the loss is NaN, the gradients stay finite |
| `PIPELINE_FAIL_SAVE_AT_STEP=N[,M]` | `before_save_commit` | saves at those global steps fail with ENOSPC once the |
| | (checkpointer) | weights file is written (a partial folder to clean up) |
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Callable, Optional

import torch


def _int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def parse_steps(text: str) -> set[int]:
    """'5' -> {5}; '5,9' -> {5, 9}; '5-8' -> {5, 6, 7, 8}."""
    steps: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            steps.update(range(int(low), int(high) + 1))
        elif part:
            steps.add(int(part))
    return steps


KILL_AT_STEP = _int("PIPELINE_KILL_AT_STEP")
KILL_AFTER_SAVE = os.environ.get("PIPELINE_KILL_AFTER_SAVE") == "1"
KILL_RANK = _int("PIPELINE_KILL_RANK") or 0
RAISE_AT_STEP = _int("PIPELINE_RAISE_AT_STEP")
WORKER_RAISE = _int("PIPELINE_WORKER_RAISE")
FAIL_SAVE_AT_STEPS = parse_steps(os.environ.get("PIPELINE_FAIL_SAVE_AT_STEP", ""))


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


def before_save_commit(global_step: Optional[int]) -> None:
    """Called by a checkpoint save once the weights file is written, before the folder is complete."""
    if global_step in FAIL_SAVE_AT_STEPS:
        raise OSError(errno.ENOSPC, "No space left on device (injected by PIPELINE_FAIL_SAVE_AT_STEP)")


def nan_injection(rank: int) -> Optional[Callable[[int, torch.Tensor], torch.Tensor]]:
    """`(optimizer step, loss) -> loss` that makes the loss NaN at the steps of `PIPELINE_NAN_AT_STEP` on this
    rank, or None when no NaN is asked for here (the guard then calls nothing). Read now, once per run."""
    steps = parse_steps(os.environ.get("PIPELINE_NAN_AT_STEP", ""))
    nan_rank = os.environ.get("PIPELINE_NAN_RANK")
    if not steps or (nan_rank is not None and int(nan_rank) != rank):
        return None
    multiply = os.environ.get("PIPELINE_NAN_GRADS", "1") != "0"

    def inject(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step not in steps:
            return loss
        return loss * float("nan") if multiply else loss + float("nan")

    return inject
