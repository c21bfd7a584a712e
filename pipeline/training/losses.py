"""Loss functions: cross-entropy (label smoothing, class weights), BCE on one-hot or multi-hot targets, and the
regression losses (mse, huber, l1 on standardised targets).

The first two take integer labels or probability targets (N x classes, from MixUp/CutMix: `pipeline.training.mixing`).
With probability targets y, label smoothing e makes them y * (1 - e) + e / classes (what torch does to hard labels,
and timm's mixup_target), and class weights w give the weighted mean sum_i sum_c w_c t_ic (-log p_ic) /
sum_i sum_c w_c y_ic: for one-hot targets exactly the integer-label loss, so an unmixed batch costs what it cost
before mixing was turned on. (torch's own probability-target loss divides by the batch size instead, which would
change the loss scale with class weights.) BCE uses the targets as they are, with class weights as pos_weight;
label smoothing is not applied to BCE (as before).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import OptimConfig


class CrossEntropy(nn.CrossEntropyLoss):
    """nn.CrossEntropyLoss for integer labels; the weighted mean above for probability targets."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            return super().forward(logits, target)
        smoothed = target * (1.0 - self.label_smoothing) + self.label_smoothing / logits.shape[-1] \
            if self.label_smoothing > 0 else target
        per_class = -F.log_softmax(logits, dim=-1) * smoothed
        if self.weight is None:
            return per_class.sum() / len(target)
        return (per_class * self.weight).sum() / (target * self.weight).sum()


class OneHotBCE(nn.Module):
    """Sigmoid BCE per class with integer targets turned into one-hot vectors (probability targets as they are)."""

    def __init__(self, num_classes: int, weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("pos_weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            target = F.one_hot(target, self.num_classes)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=self.pos_weight)


def build_loss(cfg: OptimConfig, num_classes: int, class_weights: Sequence[float] | None = None) -> nn.Module:
    weights = class_weights if class_weights is not None else cfg.class_weights
    weight = None
    if weights is not None:
        if len(weights) != num_classes:
            raise ValueError(f"optim.class_weights has {len(weights)} values; the data has {num_classes} classes")
        weight = torch.tensor(list(weights), dtype=torch.float32)
    if cfg.loss == "bce":
        return OneHotBCE(num_classes, weight)
    return CrossEntropy(weight=weight, label_smoothing=cfg.label_smoothing)


class RegressionLoss(nn.Module):
    """mse, huber or l1 between the model's outputs and the targets standardised per output, (y - mean) / std: the
    model learns standardised values (`pipeline.tasks.regression` un-standardises them for people)."""

    def __init__(self, kind: str, mean: Sequence[float], std: Sequence[float], huber_delta: float = 1.0):
        super().__init__()
        self.kind, self.huber_delta = kind, huber_delta
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32), persistent=False)

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        standardised = (target.to(outputs.dtype) - self.mean) / self.std
        if self.kind == "huber":
            return F.huber_loss(outputs, standardised, delta=self.huber_delta)
        return (F.l1_loss if self.kind == "l1" else F.mse_loss)(outputs, standardised)
