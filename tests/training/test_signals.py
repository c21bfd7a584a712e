"""TrainingSignals on hand-set gradients: layer groups, averaged gradient norms, non-finite steps counted."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

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
