"""LR schedulers. `LRSchedule` hides whether a scheduler steps per optimizer step or per epoch."""

from __future__ import annotations

import math

import torch

from pipeline.config.schema import SchedulerConfig


def warmup_cosine(warmup: int, total: int, min_ratio: float, cosine: bool = True):
    """LR multiplier: linear warmup from ~0 to 1 over `warmup` steps, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class LRSchedule:
    """One scheduler with `after_optimizer_step()` and `after_epoch(monitor_value)` hooks."""

    def __init__(self, cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                 monitor_mode: str):
        self.name = cfg.name
        # Schedule the torch optimizer inside Accelerate's wrapper: that is the object whose step() runs
        # (see Dist.optimizer_step), so the scheduler's "step() before optimizer.step()" check watches it.
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        total = steps_per_epoch * epochs
        warmup = cfg.warmup_steps + int(round(cfg.warmup_epochs * steps_per_epoch))
        if cfg.name in ("cosine", "constant"):
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, warmup_cosine(warmup, total, cfg.min_lr_ratio, cosine=cfg.name == "cosine"))
        elif cfg.name == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=cfg.gamma,
                                                                        patience=cfg.patience)

    def after_optimizer_step(self) -> None:
        if self.name in ("cosine", "constant"):
            self.scheduler.step()

    def after_epoch(self, monitor_value: float) -> None:
        if self.name == "step":
            self.scheduler.step()
        elif self.name == "plateau":
            self.scheduler.step(monitor_value)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
