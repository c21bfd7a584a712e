"""Best-metric tracking and early stopping, with state that goes into checkpoints."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    """Tracks the best value of the monitored metric; `should_stop` after `patience` bad epochs."""

    mode: str = "max"
    patience: int = 0
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.best_epoch < 0:
            self.best = -math.inf if self.mode == "max" else math.inf

    def update(self, value: float, epoch: int) -> bool:
        """Record `value`; return True if it is a new best."""
        improved = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def stop_line(self, monitor: str) -> str:
        """What a run that stopped early says."""
        return (f"early stopping: no improvement of {monitor} for {self.bad_epochs} epochs (best {self.best:.4f} "
                f"at epoch {self.best_epoch})")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
