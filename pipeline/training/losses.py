"""Loss functions: cross-entropy (label smoothing, class weights) and BCE on one-hot targets."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import OptimConfig


class OneHotBCE(nn.Module):
    """Sigmoid BCE per class with integer targets turned into one-hot vectors."""

    def __init__(self, num_classes: int, weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("pos_weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(target, self.num_classes).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, one_hot, pos_weight=self.pos_weight)


def build_loss(cfg: OptimConfig, num_classes: int, class_weights: Sequence[float] | None = None) -> nn.Module:
    weights = class_weights if class_weights is not None else cfg.class_weights
    weight = None
    if weights is not None:
        if len(weights) != num_classes:
            raise ValueError(f"optim.class_weights has {len(weights)} values; the data has {num_classes} classes")
        weight = torch.tensor(list(weights), dtype=torch.float32)
    if cfg.loss == "bce":
        return OneHotBCE(num_classes, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
