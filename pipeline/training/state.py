"""Where a training loop stands (saved in every checkpoint's state.json) and how a resume says it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's state.json."""

    epoch: int = 0
    """Epochs completed."""
    global_step: int = 0
    """Optimizer steps taken (including updates skipped for non-finite values: a step of the data stream)."""
    step_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed by this rank."""
    stopped_early: bool = False
    """Early stopping ended training."""


def resume_point(state: TrainState) -> str:
    """Where a resume goes on, in the epoch numbers the epoch lines print (1-based; `state.epoch` counts the epochs
    completed): 'in epoch 5 after 3 of its batches (step 63)' or 'after epoch 4 (step 60)'."""
    if state.step_in_epoch:
        return (f"in epoch {state.epoch + 1} after {state.step_in_epoch} of its batches "
                f"(step {state.global_step})")
    return f"after epoch {state.epoch} (step {state.global_step})"
