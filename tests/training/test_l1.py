"""optim.l1: the penalty's gradient is exactly l1 x sign(w) added to the loss gradient, on the penalised weights
only (not norms and biases with optim.exclude_norm_and_bias), and a training run applies it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config.schema import OptimConfig
from pipeline.training.optim import NoPenalty, build_l1_penalty


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _grads(model: nn.Module, penalty) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    model.zero_grad()
    penalty(nn.functional.cross_entropy(model(images), labels)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("exclude", [True, False])
def test_gradient_is_the_loss_gradient_plus_l1_times_sign(exclude):
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 0.0  # sign(0) = 0: the subgradient torch takes
    plain = _grads(model, NoPenalty())
    penalised = _grads(model, build_l1_penalty(OptimConfig(l1=0.01, exclude_norm_and_bias=exclude), model))
    params = dict(model.named_parameters())
    exempt = {"0.bias", "1.weight", "1.bias", "4.bias"} if exclude else set()
    for name, grad in penalised.items():
        expected = plain[name] if name in exempt else plain[name] + 0.01 * torch.sign(params[name].detach())
        assert torch.equal(grad, expected), name
    assert penalised["0.weight"][0, 0, 0, 0] == plain["0.weight"][0, 0, 0, 0]


def test_frozen_weights_are_left_out_and_zero_l1_costs_nothing():
    model = _model()
    model[0].weight.requires_grad_(False)
    penalty = build_l1_penalty(OptimConfig(l1=0.5), model)
    loss = torch.tensor(1.0)
    assert torch.equal(penalty(loss), loss + 0.5 * model[4].weight.abs().sum())
    assert isinstance(build_l1_penalty(OptimConfig(l1=0.0), model), NoPenalty)
    with pytest.raises(ValueError, match=r"optim.l1=-0.1 is out of range; it must be >= 0.0"):
        OptimConfig(l1=-0.1)


def test_training_with_l1_shrinks_the_weights(tmp_path, digits_root):
    from pipeline.commands.train import train
    from pipeline.config import load_config
    from tests.conftest import ROOT, TINY

    def weights_l1(l1: float) -> float:
        train(load_config(ROOT / "configs" / "default.yaml", [
            f"data.root={digits_root}", f"run.output_dir={tmp_path}", f"run.name=l1_{l1}", "data.num_workers=0",
            "train.epochs=1", f"optim.l1={l1}", *TINY]))
        from safetensors.torch import load_file

        state = load_file(str(tmp_path / f"l1_{l1}" / "checkpoints" / "best" / "model.safetensors"))
        return float(sum(v.abs().sum() for k, v in state.items() if v.ndim == 4 or k == "head.2.weight"))

    assert weights_l1(0.01) < 0.9 * weights_l1(0.0)
