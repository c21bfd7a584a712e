"""Classification metrics with torchmetrics; states are synced across ranks when computed.

torchmetrics is imported when metrics are made, not with the module: it loads scipy and matplotlib (seconds), which
a command that computes no metrics (predict, a refused run) does not need.
"""

from __future__ import annotations

import torch


class ClassificationMetrics:
    """Accuracy, macro precision/recall/F1, AUROC, confusion matrix, mean loss and sample count."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        from torchmetrics import MeanMetric, MetricCollection, SumMetric
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassAUROC,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        self.collection = MetricCollection({
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes, average="macro"),
            "recall_macro": MulticlassRecall(num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro", thresholds=None),
            "confusion_matrix": MulticlassConfusionMatrix(num_classes),
        }).to(device)
        self.loss = MeanMetric().to(device)
        self.count = SumMetric().to(device)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        probs = logits.float().softmax(dim=-1)
        self.collection.update(probs, target)
        self.loss.update(loss.detach().float(), weight=target.numel())
        self.count.update(torch.tensor(float(target.numel()), device=target.device))

    def compute(self) -> dict:
        """All metrics as plain Python values (every rank must call this: it all-gathers)."""
        values = {k: v for k, v in self.collection.compute().items()}
        result = {k: float(v) for k, v in values.items() if k != "confusion_matrix"}
        result["confusion_matrix"] = values["confusion_matrix"].long().tolist()
        result["loss"] = float(self.loss.compute())
        result["num_samples"] = int(self.count.compute())
        return result

    def reset(self) -> None:
        self.collection.reset()
        self.loss.reset()
        self.count.reset()
