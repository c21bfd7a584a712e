"""TrainingSignals on hand-set gradients, and the evaluation analysis on crafted predictions: exact values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.evaluation.analysis import (
    analyse,
    confusion_matrix,
    expected_calibration_error,
    most_confused_pairs,
    per_class_metrics,
    top_k_accuracy,
)
from pipeline.models import SimpleCNN
from pipeline.training.grad_stats import TrainingSignals, layer_groups


def fake_trainer(model: nn.Module) -> SimpleNamespace:
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "name": "decay", "lr": 0.25}])
    stream = SimpleNamespace(samples_per_epoch=lambda: 100)
    return SimpleNamespace(unwrapped=model, optimizer=optimizer, dist=SimpleNamespace(device=torch.device("cpu"),
                           world_size=2), train_data=SimpleNamespace(stream=stream))


def test_layer_groups_of_simple_cnn():
    model = SimpleCNN(10, 1, (4, 8))
    assert list(layer_groups(model)) == ["features.0", "features.1", "head.2"]


def test_signals_average_grad_norms_and_count_nonfinite_steps():
    model = SimpleCNN(3, 1, (2, 2))
    trainer = fake_trainer(model)
    signals = TrainingSignals()
    signals.on_fit_start(trainer)
    signals.on_epoch_start(trainer, 0)
    groups = layer_groups(model)
    sizes = {k: sum(p.numel() for _, p in v) for k, v in groups.items()}
    for value in (1.0, 3.0, float("nan")):  # two finite steps (all grads 1, then 3) and one NaN step
        for p in model.parameters():
            p.grad = torch.full_like(p, value)
        signals.on_before_optimizer_step(trainer)
    record: dict = {}
    signals.on_epoch_end(trainer, record)
    total = sum(sizes.values())
    assert record["grad_norm/global"] == pytest.approx(2.0 * math.sqrt(total), rel=1e-6)  # mean of 1x and 3x
    assert record["grad_norm/global_max"] == pytest.approx(3.0 * math.sqrt(total), rel=1e-6)
    for name, size in sizes.items():
        assert record[f"grad_norm/{name}"] == pytest.approx(2.0 * math.sqrt(size), rel=1e-6)
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert record["weight_norm/global"] == pytest.approx(float(weights.norm()), rel=1e-6)
    assert record["nonfinite_step_fraction"] == pytest.approx(1 / 3)
    assert record["lr/decay"] == 0.25
    assert record["images_per_second"] > 0
    assert sorted(k for k in record if k.startswith("grad_norm/")) == sorted(
        ["grad_norm/global", "grad_norm/global_max", *(f"grad_norm/{k}" for k in sizes)])


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


def test_capture_is_not_changed_by_inplace_relu_and_hooks_are_removed():
    from pipeline.commands.visualize.hooks import feature_maps, grad_cam

    torch.manual_seed(0)
    model = SimpleCNN(3, 1, (4, 8))
    images = torch.randn(2, 1, 8, 8)
    maps = feature_maps(model, images, ["features.0.0.1", "features.0.0.2"])  # BN output, then in-place ReLU
    assert maps["features.0.0.1"].shape == (2, 4, 8, 8)
    assert (maps["features.0.0.1"] < 0).any() and not (maps["features.0.0.2"] < 0).any()
    model.train()
    cams, logits = grad_cam(model, "features.1.0.0", images)
    assert cams.shape == (2, 8, 8) and float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 + 1e-6
    assert logits.shape == (2, 3)
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # every hook removed
    assert all(p.grad is None for p in model.parameters())
