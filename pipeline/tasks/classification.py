"""task.type=classification: one class per image, softmax, cross-entropy (or one-hot BCE): the pipeline's default."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.config.schema import OptimConfig
from pipeline.evaluation.analysis import analyse
from pipeline.evaluation.metrics import ClassificationMetrics
from pipeline.tasks.base import Task
from pipeline.training.losses import build_loss


class Classification(Task):
    type = "classification"
    output_rule = "logits, one per class: softmax gives the class probabilities"
    train_metric = "accuracy"
    headline = ("val/accuracy", "val_acc")
    test_keys = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "confusion_matrix", "num_samples")

    def __init__(self, classes: Sequence[str], optim: OptimConfig):
        super().__init__(classes)
        self.optim = optim

    def build_loss(self, class_weights: Sequence[float] | None) -> nn.Module:
        return build_loss(self.optim, len(self.classes), class_weights)

    def metrics(self, device: torch.device | str = "cpu") -> ClassificationMetrics:
        return ClassificationMetrics(len(self.classes), device)

    def train_score(self, logits: torch.Tensor, targets) -> torch.Tensor:
        return targets.correct(logits)  # with mixed targets: their weight on the predicted class

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(dim=-1)

    def describe(self, outputs: torch.Tensor, top_k: int) -> list[dict]:
        values, indices = outputs.topk(min(top_k, len(self.classes)), dim=-1)
        return [{"top_k": [{"class": self.classes[c], "probability": q} for c, q in zip(i, p)]}
                for p, i in zip(values.tolist(), indices.tolist())]

    def analyse(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
        return analyse(outputs, labels, self.classes)
