"""Where a training loop stands (saved in every checkpoint's state.json), its epoch's partial sums, and how a resume
says it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


class EpochSums:
    """The epoch's loss sum, training-score sum and sample count so far, on the device: adding a step's never syncs
    with the host (torch.full is a fill kernel, torch.tensor would be a synchronising copy). Non-finite losses are
    left out (the non-finite guard counts them). Each rank's `tensor` is saved in its checkpoint state."""

    def __init__(self, device: torch.device):
        self.tensor = torch.zeros(3, device=device)

    def add(self, loss: torch.Tensor, score: torch.Tensor, count: int) -> None:
        loss = loss.detach()
        row = torch.stack([loss * count, score, score.new_full((), float(count))])
        self.tensor += torch.where(torch.isfinite(loss), row, 0.0)

    def means(self, dist, score_name: str) -> dict:
        """The epoch's mean loss and training score over every rank's samples; the sums start again at zero."""
        totals = dist.reduce_sum(self.tensor.clone())
        self.tensor.zero_()
        return {"loss": float(totals[0] / totals[2]), score_name: float(totals[1] / totals[2])}
