"""Exponential moving average of the weights, as timm's ModelEmaV3 keeps it.

The EMA copy is a second module updated after optimizer steps:
``ema = decay * ema + (1 - decay) * weights`` (``torch.lerp``), with timm's decay schedule: 0 at the first step (the
copy starts as the weights), optionally warmed up as ``min(decay, 1 - t^(-2/3))`` after optimizer step t. Floating
buffers (BatchNorm running mean and variance) are averaged like parameters, as timm's default does, or copied from
the trained model (timm's ``exclude_buffers=True``); integer buffers (``num_batches_tracked``) are always copied.
When on, the trainer validates, checkpoints as best and tests this copy.

Several ranks: every rank updates its own copy, and the copies stay identical without any communication for the
parameters: DDP all-reduces the gradients, so after each optimizer step every rank holds the same weights, and the
same deterministic lerp with the same decay gives the same EMA. Only BatchNorm running statistics differ between
ranks (each rank's forward updates them from its own micro-batch; DDP re-broadcasts rank 0's before the next
forward), so averaged buffers would drift apart; `sync` gives every rank rank 0's before each validation and each
checkpoint (a few KB, twice an epoch at most), which is what makes the saved EMA the one every rank evaluates and
a resume bit-exact on every rank. With model.sync_bn the statistics are global and the broadcast changes nothing.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from pipeline.config.schema import TrainConfig
from pipeline.distributed import Dist

WARMUP_GAMMA, WARMUP_POWER = 1.0, 2 / 3
"""timm's ModelEmaV3 warm-up defaults (from @crowsonkb's EMA warm-up)."""


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """The decay applied at the update after optimizer step `step` (1-based): timm ModelEmaV3.get_decay."""
    step = max(0, step - 1)
    if step <= 0:
        return 0.0
    if warmup:
        return max(min(1 - (1 + step / WARMUP_GAMMA) ** -WARMUP_POWER, decay), 0.0)
    return decay


class ModelEma:
    """The EMA copy (`module`, in eval mode, no gradients) of the trained model `source` and how it is updated."""

    enabled = True
    weights_name = "ema"
    """What evaluation uses, as the run's summary line and run_info.json say it."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every_steps: int = 1,
                 buffers: str = "average"):
        self.source = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.every_steps = decay, warmup, every_steps
        self.average_buffers = buffers == "average"

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step`: move the copy towards the trained weights (every `every_steps` steps)."""
        if step % self.every_steps:
            return
        model = self.source
        weight = 1.0 - ema_decay(step, self.decay, self.warmup)
        if self.average_buffers:
            pairs = zip(self.module.state_dict().values(), model.state_dict().values())
        else:
            pairs = zip(self.module.parameters(), model.parameters())
            for ema_b, model_b in zip(self.module.buffers(), model.buffers()):
                ema_b.copy_(model_b)
        averaged, current = [], []
        for ema_v, model_v in pairs:
            if ema_v.is_floating_point():
                averaged.append(ema_v)
                current.append(model_v.detach())
            else:
                ema_v.copy_(model_v)
        if averaged:
            torch._foreach_lerp_(averaged, current, weight)

    @torch.no_grad()
    def copy_source(self) -> None:
        """Make the copy equal to the trained weights (a resume from a checkpoint that held no EMA)."""
        for ema_v, model_v in zip(self.module.state_dict().values(), self.source.state_dict().values()):
            ema_v.copy_(model_v)

    def sync(self, dist: Dist) -> None:
        """Rank 0's buffers on every rank (see the module docstring); parameters are identical already."""
        if self.average_buffers:
            dist.broadcast_tensors([b for b in self.module.buffers() if b.is_floating_point()])


class NoEma:
    """EMA off: nothing to update, save or sync; evaluation uses the trained weights."""

    enabled = False
    module: Optional[nn.Module] = None
    weights_name = "model"

    def update(self, step: int) -> None:
        pass

    def copy_source(self) -> None:
        pass

    def sync(self, dist: Dist) -> None:
        pass


def build_ema(cfg: TrainConfig, model: nn.Module) -> ModelEma | NoEma:
    """The EMA of `model` (the unwrapped module, on its device, whose parameters the optimizer steps) per
    train.ema_*, or the do-nothing one."""
    if cfg.ema_decay <= 0:
        return NoEma()
    return ModelEma(model, cfg.ema_decay, cfg.ema_warmup, cfg.ema_every_steps, cfg.ema_buffers)


def first_weights_share(decay: float, warmup: bool, updates: int) -> float:
    """The share of the first update's weights (a copy of the model after step 1) left in the EMA after `updates`
    updates: the product of every later update's decay. Without warm-up that is decay^(updates - 1); with it the
    product falls under 1e-12 within a few hundred updates, where it stops (start-up stays instant on long runs)."""
    if not warmup:
        return decay ** max(0, updates - 1)
    share = 1.0
    for step in range(2, updates + 1):
        share *= ema_decay(step, decay, warmup)
        if share < 1e-12:
            break
    return share


SHORT_RUN_SHARE = 0.1
"""Above this share of the first weights in the final EMA, a run warns at start (`short_run_warning`)."""


def short_run_warning(cfg: TrainConfig, optimizer_steps: int) -> str:
    """One line when the EMA would still hold more than SHORT_RUN_SHARE of the barely trained first weights at the
    end of the run, else ''. Measured: digits, 4 epochs (88 steps), train.ema_decay=0.99 without warm-up: the EMA's
    validation accuracy stayed at 10-14% while the trained weights reached 95%; with train.ema_warmup=true, 93%."""
    if cfg.ema_decay <= 0:
        return ""
    updates = optimizer_steps // cfg.ema_every_steps
    share = first_weights_share(cfg.ema_decay, cfg.ema_warmup, updates)
    if share <= SHORT_RUN_SHARE:
        return ""
    fits = 0.01 ** (1 / max(1, updates - 1))  # a decay that leaves 1% of the first weights
    return (f"warning: train.ema_decay={cfg.ema_decay:g} is long for this run's {updates} EMA updates: {share:.0%} of "
            f"the EMA at the end is the weights after step 1, and the EMA is what is validated, kept and tested; set "
            f"train.ema_warmup=true or train.ema_decay<={fits:.3f}")


__all__ = ["ModelEma", "NoEma", "build_ema", "ema_decay", "first_weights_share", "short_run_warning"]
