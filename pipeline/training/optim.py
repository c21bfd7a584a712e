"""Optimizer factory: SGD, Adam, AdamW, RMSprop; weight decay optionally off for norms and biases."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.schema import OptimConfig

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool) -> list[dict]:
    """Trainable parameters split into decayed and not-decayed groups (frozen ones are left out)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = exclude_norm_and_bias and (isinstance(module, NORM_TYPES) or name == "bias" or param.ndim <= 1)
            (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, model: nn.Module, groups: list[dict] | None = None,
                    fused: bool = False) -> torch.optim.Optimizer:
    """`groups` (e.g. per-layer learning rates from fine-tuning) replaces the default decay/no-decay split.

    `fused`: the single-kernel implementation (for training on CUDA) where torch has one (SGD, Adam, AdamW);
    otherwise torch's default (multi-tensor on CUDA, per-tensor on CPU).
    """
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay, cfg.exclude_norm_and_bias)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = {"fused": True} if fused and cfg.name in ("sgd", "adam", "adamw") else {"foreach": None}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               **fused)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **fused)
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, **fused)
