"""The evaluation analysis on crafted predictions: per-class metrics, top-k, ECE, confusion, exact values."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation.analysis import (
    analyse,
    confusion_matrix,
    expected_calibration_error,
    most_confused_pairs,
    per_class_metrics,
    top_k_accuracy,
)


def test_per_class_topk_ece_and_confusion_on_crafted_predictions():
    probs = torch.tensor([[0.9, 0.05, 0.05],   # true 0, right, conf 0.9
                          [0.6, 0.3, 0.1],     # true 1, predicted 0, conf 0.6
                          [0.2, 0.7, 0.1],     # true 1, right, conf 0.7
                          [0.1, 0.5, 0.4]])    # true 2, predicted 1, conf 0.5
    labels = torch.tensor([0, 1, 1, 2])
    confusion = confusion_matrix(probs.argmax(-1), labels, 3)
    assert confusion.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 0]]
    rows = per_class_metrics(confusion, ["a", "b", "c"])
    assert rows[0] == {"class": "a", "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert rows[1] == {"class": "b", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert rows[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert top_k_accuracy(probs, labels) == {"top1": 0.5, "top3": 1.0}
    assert top_k_accuracy(probs, labels, (2,)) == {"top2": 1.0}
    # 15 bins: 0.9 -> bin 13 (acc 1), 0.6 -> bin 8 (acc 0), 0.7 -> bin 10 (acc 1), 0.5 -> bin 7 (acc 0)
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(0 - 0.5)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert most_confused_pairs(confusion, ["a", "b", "c"]) == [{"true": "b", "predicted": "a", "count": 1},
                                                               {"true": "c", "predicted": "b", "count": 1}]
    assert set(analyse(probs, labels, ["a", "b", "c"])) == {"per_class", "top_k", "ece", "most_confused"}


def test_perfectly_calibrated_confident_predictions_have_zero_ece():
    probs = torch.eye(4)
    assert expected_calibration_error(probs, torch.arange(4)) == 0.0
