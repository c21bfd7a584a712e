"""The one interface every task type implements: what its labels become, its loss, metrics, outputs and state.

A task answers every question the loop, the evaluation and the commands would otherwise answer with
`if task.type == ...` (see `pipeline.tasks` for the three kinds)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Task:
    """Base of the task types; each method says what the loop or a command asks of it."""

    type = ""
    train_metric = ""
    """The name of the training score `train_score` sums (epoch records: train/<name>)."""
    headline = ("", "")
    """(epoch-record key, short label) shown on each epoch line, e.g. ('val/accuracy', 'val_acc')."""
    test_keys: tuple[str, ...] = ()
    """The metrics a test (or re-)evaluation records, besides the loss."""
    class_word = "class"
    """What an entry of `classes` is: class or output."""
    output_rule = ""
    """What the exported model's outputs mean, for the export sidecar."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    def counted(self) -> str:
        """The start line's '10 classes' (with the task named when it is not classification)."""
        return f"{len(self.classes)} classes" + ("" if self.type == "classification" else f", {self.type}")

    def build_loss(self, class_weights: Sequence[float] | None) -> nn.Module:
        raise NotImplementedError

    def metrics(self, device: torch.device | str = "cpu"):
        """A metrics object: update(logits, targets, loss), compute() -> dict (synced over ranks), reset()."""
        raise NotImplementedError

    def train_score(self, logits: torch.Tensor, targets) -> torch.Tensor:
        """The batch's training score, summed over its samples (a 0-d tensor on the device: no host sync)."""
        raise NotImplementedError

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's raw outputs mean: probabilities, or values in the labels' units."""
        raise NotImplementedError

    def describe(self, outputs: torch.Tensor, top_k: int) -> list[dict]:
        """Per image, what `pipeline predict` reports."""
        raise NotImplementedError

    def analyse(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
        """`pipeline evaluate`'s detail from one split's outputs and labels (per class or per output)."""
        raise NotImplementedError

    def state(self) -> dict:
        """What the task learned or was given besides the weights (checkpoints, task.json, export sidecar)."""
        return {"type": self.type}

    def load_state(self, state: dict) -> None:
        """Take a `state()` written earlier (a run's task.json)."""

    def tune(self, outputs: torch.Tensor, labels: torch.Tensor) -> str:
        """Fit what is fitted on the validation split with the best weights (thresholds); a line saying what, or ''."""
        return ""

    @property
    def tunes(self) -> bool:
        """Whether `tune` needs the validation split's outputs after training."""
        return False
