"""Optimizer factory: SGD, Adam, AdamW, RMSprop; weight decay optionally off for norms and biases; the L1 penalty."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config.schema import OptimConfig

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _exempt(module: nn.Module, name: str, param: nn.Parameter, exclude_norm_and_bias: bool) -> bool:
    """Whether `param` (called `name` in `module`) gets no weight decay and no L1 penalty."""
    return exclude_norm_and_bias and (isinstance(module, NORM_TYPES) or name == "bias" or param.ndim <= 1)


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool) -> list[dict]:
    """Trainable parameters split into decayed and not-decayed groups (frozen ones are left out)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if _exempt(module, name, param, exclude_norm_and_bias) else decay).append(param)
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


class L1Penalty:
    """`penalty(loss)`: loss + l1 x sum(abs(w)) over the penalised weights that train now (a gradually unfrozen group
    joins when it is unfrozen), so each gets l1 x sign(w) added to its gradient: the same on every rank, so DDP's
    average keeps it, and scaled with the loss under fp16's GradScaler."""

    def __init__(self, l1: float, params: list[nn.Parameter]):
        self.l1, self.params = l1, params

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        trainable = [p for p in self.params if p.requires_grad]
        if not trainable:
            return loss
        return loss + self.l1 * torch.stack([p.abs().sum() for p in trainable]).sum().to(loss.dtype)


class NoPenalty:
    """optim.l1=0: the loss as it is."""

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        return loss


def build_l1_penalty(cfg: OptimConfig, model: nn.Module) -> L1Penalty | NoPenalty:
    """The L1 penalty over the weights that get weight decay (not norms and biases with exclude_norm_and_bias)."""
    if cfg.l1 == 0:
        return NoPenalty()
    params = [p for m in model.modules() for n, p in m.named_parameters(recurse=False)
              if not _exempt(m, n, p, cfg.exclude_norm_and_bias)]
    return L1Penalty(cfg.l1, params)
