"""task.type=multilabel: any set of the classes per image; a sigmoid per class, BCE-with-logits on multi-hot targets.

Targets arrive multi-hot from the loader (`pipeline.data.dataset.keys`); MixUp/CutMix mix them like one-hot ones. A
class is predicted when its probability is at least its threshold: task.threshold for every class, or per class the
threshold of the best F1 on the validation split (`tune`, with sklearn's precision_recall_curve). Metrics are
torchmetrics': map_macro (mean over classes of the average precision; threshold-free), f1_micro, f1_macro,
exact_match (the predicted set is the true set) and hamming_loss (wrong (image, class) decisions / all).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.tasks.base import Task
from pipeline.training.losses import OneHotBCE


def pos_weights(class_counts: Sequence[int], num_samples: int) -> list[float]:
    """BCE's pos_weight per class: negatives / positives in the training split (1 for a class never seen)."""
    return [(num_samples - n) / n if n else 1.0 for n in class_counts]


class MultilabelMetrics:
    """map_macro, f1_micro, f1_macro, exact_match, hamming_loss, mean loss and sample count (synced over ranks)."""

    def __init__(self, thresholds: torch.Tensor, device: torch.device | str = "cpu"):
        from torchmetrics import MeanMetric, MetricCollection, SumMetric  # here: see pipeline.evaluation.metrics
        from torchmetrics.classification import (
            MultilabelAveragePrecision,
            MultilabelExactMatch,
            MultilabelF1Score,
            MultilabelHammingDistance,
        )

        count = len(thresholds)
        self.thresholds = thresholds.to(device)
        self.ranked = MetricCollection({"map_macro": MultilabelAveragePrecision(count, average="macro")}).to(device)
        self.decided = MetricCollection({
            "f1_micro": MultilabelF1Score(count, average="micro"),
            "f1_macro": MultilabelF1Score(count, average="macro"),
            "exact_match": MultilabelExactMatch(count),
            "hamming_loss": MultilabelHammingDistance(count, average="micro"),
        }).to(device)
        self.loss, self.count = MeanMetric().to(device), SumMetric().to(device)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        probs, target = logits.float().sigmoid(), target.round().long()
        self.ranked.update(probs, target)
        self.decided.update((probs >= self.thresholds).long(), target)  # integer predictions: no threshold of its own
        self.loss.update(loss.detach().float(), weight=len(target))
        self.count.update(torch.tensor(float(len(target)), device=target.device))

    def compute(self) -> dict:
        values = {**self.ranked.compute(), **self.decided.compute()}
        return {**{k: float(v) for k, v in values.items()}, "loss": float(self.loss.compute()),
                "num_samples": int(self.count.compute())}

    def reset(self) -> None:
        for metric in (self.ranked, self.decided, self.loss, self.count):
            metric.reset()


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float = 0.5) -> list[float]:
    """Per class, the probability threshold with the highest F1 on these outputs (sklearn's precision_recall_curve);
    `default` for a class without positives."""
    from sklearn.metrics import precision_recall_curve

    thresholds = []
    for c in range(probs.shape[1]):
        truth = targets[:, c].numpy() > 0.5
        if not truth.any():
            thresholds.append(default)
            continue
        precision, recall, cuts = precision_recall_curve(truth, probs[:, c].double().numpy())
        f1 = 2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]).clip(min=1e-12)
        thresholds.append(float(cuts[int(f1.argmax())]))
    return thresholds


class Multilabel(Task):
    type = "multilabel"
    output_rule = ("logits, one per class: sigmoid gives each class's probability; a class is predic"
                   "ted when it is >= its threshold (task.thresholds)")
    train_metric = "exact_match"
    headline = ("val/map_macro", "val_map")
    test_keys = ("map_macro", "f1_micro", "f1_macro", "exact_match", "hamming_loss", "num_samples")

    def __init__(self, classes: Sequence[str], threshold: str):
        super().__init__(classes)
        self.tuned = threshold == "tune"
        value = 0.5 if self.tuned else float(threshold)
        self.thresholds = [value] * len(self.classes)

    def build_loss(self, class_weights: Sequence[float] | None) -> nn.Module:
        if class_weights is not None and len(class_weights) != len(self.classes):
            raise ValueError(f"optim.class_weights has {len(class_weights)} values; the data has "
                             f"{len(self.classes)} classes")
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights is not None else None
        return OneHotBCE(len(self.classes), weight)

    def metrics(self, device: torch.device | str = "cpu") -> MultilabelMetrics:
        return MultilabelMetrics(torch.tensor(self.thresholds), device)

    def train_score(self, logits: torch.Tensor, targets) -> torch.Tensor:
        """Images whose predicted set (probability >= 0.5) is the target's set (a mixed target's classes >= 0.5)."""
        target = targets.targets(logits.shape[-1])
        return ((logits.detach() >= 0) == (target >= 0.5)).all(dim=-1).sum().float()

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def describe(self, outputs: torch.Tensor, top_k: int) -> list[dict]:
        """Every class at or above its threshold, most probable first (`top_k` does not limit them)."""
        rows = []
        for probs in outputs.tolist():
            found = sorted(((p, c) for c, p in enumerate(probs) if p >= self.thresholds[c]), reverse=True)
            rows.append({"labels": [{"class": self.classes[c], "probability": p, "threshold": self.thresholds[c]}
                                    for p, c in found]})
        return rows

    def analyse(self, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
        from torchmetrics.functional.classification import (
            multilabel_average_precision,
            multilabel_f1_score,
            multilabel_precision,
            multilabel_recall,
        )

        target, count = labels.round().long(), len(self.classes)
        decided = (outputs >= torch.tensor(self.thresholds)).long()
        columns = {"ap": multilabel_average_precision(outputs, target, count, average="none"),
                   **{name: fn(decided, target, count, average="none") for name, fn in
                      (("precision", multilabel_precision), ("recall", multilabel_recall),
                       ("f1", multilabel_f1_score))}}
        support = target.sum(dim=0).tolist()
        return {"per_class": [{"class": name, **{k: float(v[i]) for k, v in columns.items()},
                               "support": int(support[i]), "threshold": self.thresholds[i]}
                              for i, name in enumerate(self.classes)],
                "labels_per_image": {"true": float(target.sum(dim=1).float().mean()),
                                     "predicted": float(decided.sum(dim=1).float().mean())}}

    @property
    def tunes(self) -> bool:
        return self.tuned

    def tune(self, outputs: torch.Tensor, labels: torch.Tensor) -> str:
        self.thresholds = best_f1_thresholds(outputs, labels)
        shown = ", ".join(f"{c} {t:.2f}" for c, t in zip(self.classes[:6], self.thresholds))
        return f"task.threshold=tune: per-class thresholds of the best validation F1: {shown}" + \
            (", ..." if len(self.classes) > 6 else "")

    def state(self) -> dict:
        return {"type": self.type, "thresholds": list(self.thresholds), "tuned": self.tuned}

    def load_state(self, state: dict) -> None:
        if len(state.get("thresholds", ())) == len(self.classes):
            self.thresholds = [float(t) for t in state["thresholds"]]
