"""Hooks into the training loop, so features (fine-tuning schedules, diagnostics, tuning) plug in
without editing the loop. Every method is optional; the default does nothing.

Each hook gets the `pipeline.training.trainer.Trainer` running the loop (typed `Any` here: the trainer imports
this module, and this one stays below it).
"""

from __future__ import annotations

from typing import Any, Optional

Trainer = Any
"""What a hook receives: the loop's `Trainer`."""


class Callback:
    """Base class: override what you need."""

    name = "callback"

    def on_fit_start(self, trainer: "Trainer") -> None:
        """After resume (trainer.state is final), before the first epoch."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Before epoch `epoch` (0-based) starts or resumes."""

    def on_before_optimizer_step(self, trainer: "Trainer") -> None:
        """Gradients are complete (and unscaled/clipped); the optimizer is about to step (unless they are
        non-finite: then the non-finite guard, which runs next, skips or halts)."""

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        """`record` is the epoch's metrics.jsonl entry; add keys to it here. Raise to stop the run."""

    def state_dict(self) -> dict:
        """State saved in checkpoints (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


class CallbackList:
    """Calls every callback in order."""

    def __init__(self, callbacks: Optional[list[Callback]] = None):
        self.callbacks = list(callbacks or [])

    def __getattr__(self, hook: str):
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def call(*args, **kwargs) -> None:
            for callback in self.callbacks:
                getattr(callback, hook)(*args, **kwargs)

        return call

    def state_dict(self) -> dict:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])
