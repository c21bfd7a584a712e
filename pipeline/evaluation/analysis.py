"""Deeper evaluation from predicted probabilities: per-class P/R/F1/support, top-k accuracy, calibration
(expected calibration error) and the most-confused class pairs.
"""

from __future__ import annotations

from typing import Sequence

import torch

ECE_BINS = 15


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    index = labels.long() * num_classes + predicted.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(confusion: torch.Tensor, classes: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of every class (0 where undefined, as torchmetrics does)."""
    confusion = confusion.double()
    true_pos = confusion.diag()
    predicted = confusion.sum(dim=0)
    support = confusion.sum(dim=1)
    rows = []
    for i, name in enumerate(classes):
        precision = float(true_pos[i] / predicted[i]) if predicted[i] > 0 else 0.0
        recall = float(true_pos[i] / support[i]) if support[i] > 0 else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": int(support[i])})
    return rows


def top_k_accuracy(probs: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """`top{k}` accuracy for every k that is smaller than or equal to the number of classes."""
    result = {}
    ranked = probs.argsort(dim=-1, descending=True)
    for k in ks:
        if k <= probs.shape[1]:
            hit = (ranked[:, :k] == labels[:, None]).any(dim=1)
            result[f"top{k}"] = float(hit.float().mean())
    return result


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the bin's share."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).double()
    confidence = confidence.double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 falls into the first bin
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += float(mask.double().mean() * (correct[mask].mean() - confidence[mask].mean()).abs())
    return ece


def most_confused_pairs(confusion: torch.Tensor, classes: Sequence[str], top: int = 5) -> list[dict]:
    """Off-diagonal cells with the most errors: (true class, predicted class, count), largest first."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    cells = [(int(off[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes)) if off[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": classes[i], "predicted": classes[j], "count": n} for n, i, j in cells[:top]]


def analyse(probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict:
    """Everything above for one split's predictions."""
    confusion = confusion_matrix(probs.argmax(dim=-1), labels, len(classes))
    return {"per_class": per_class_metrics(confusion, classes), "top_k": top_k_accuracy(probs, labels),
            "ece": expected_calibration_error(probs, labels), "most_confused": most_confused_pairs(confusion, classes)}
