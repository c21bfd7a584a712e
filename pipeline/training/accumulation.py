"""Gradient accumulation windows: which micro-batches of an epoch make one optimizer step.

An epoch of `micro_batches` is cut into windows of `accum` micro-batches; the last one may be shorter (its loss is
divided by its own size). The trainer asks each micro-batch's window; the LR schedule counts the windows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccumulationWindows:
    """The accumulation windows of one epoch (or of the part of it a resume continues)."""

    micro_batches: int
    """Micro-batches in the epoch (this rank's steps)."""
    accum: int
    """train.grad_accum_steps: micro-batches per optimizer step."""

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps in the epoch: one per window, the last one possibly short."""
        return -(-self.micro_batches // self.accum)

    def window(self, micro: int) -> tuple[int, bool]:
        """(size of the window holding micro-batch `micro`, whether `micro` is its last: the optimizer steps)."""
        start = micro - micro % self.accum
        size = min(self.accum, self.micro_batches - start)
        return size, micro - start == size - 1
