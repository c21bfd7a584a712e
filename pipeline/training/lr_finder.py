"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2015), as fastai's
`lr_find` and Lightning's `Tuner.lr_find` run it.

The model trains for at most `steps` optimizer steps on the real training loader while the learning rate grows
exponentially from `start_lr` to `end_lr` (each param group keeps its own multiplier: fine-tuning's per-layer rates).
The loss of each step, averaged over the ranks, is smoothed with the bias-corrected moving average fastai and
Lightning use (beta 0.98); the sweep stops when the smoothed loss passes `diverge` x its minimum (both use 4) or a
loss is not finite. Every rank sees the same averaged losses, so every rank stops at the same step and computes
the same suggestion.

The suggestion follows the optimizer, because each rule was tuned on one family:
- adaptive optimizers (adam, adamw, rmsprop): fastai's default rule since 2.5, `valley` (tuned with fastai's default
  optimizer, Adam): the longest stretch over which the smoothed loss keeps falling (the longest decreasing
  subsequence), and within it the point 1/2 of the way in (index start + 1/3 + 1/6 of its length). It sits where the
  loss falls fast, well before the minimum.
- SGD: `bottom`, Smith's rule for the peak of a one-cycle (warm-up then anneal) schedule ("A disciplined approach to
  neural network hyper-parameters", 2018: the largest rate at which the loss still falls): from the valley point, the
  last new low of the smoothed loss before it makes none for a factor `BOTTOM_PATIENCE` in lr. SGD with batch norm
  takes rates near that bottom once warmed up; the valley point is far below them (CIFAR-10 CPU recipe, 5 epochs,
  seed 0: valley 0.0148 trained to 77.05% against 81.34% at the shipped 0.2; docs/training.md).
The other rules are recorded beside it: `valley`, `bottom`, `steepest` (Lightning's: the most negative slope of the
smoothed loss, which single noisy steps can move) and `minimum / 10` (fastai 1's).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

SMOOTHING = 0.98
DIVERGE = 4.0
BOTTOM_PATIENCE = 4.0
"""`bottom` ends when the smoothed loss has made no new low while the lr grew by this factor."""
RULES = {"sgd": "bottom", "adam": "valley", "adamw": "valley", "rmsprop": "valley"}
"""The suggestion's rule for each optimizer (see the module docstring)."""


def sweep_lrs(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """`steps` learning rates growing exponentially from start_lr to end_lr (both included)."""
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise ValueError(f"lr-find: --start-lr {start_lr:g} and --end-lr {end_lr:g} must be finite with "
                         "0 < start < end")
    if steps < 10:
        raise ValueError(f"lr-find: --steps {steps} is too few for a curve; give at least 10 (100 is usual)")
    return [start_lr * (end_lr / start_lr) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of `losses` (fastai's and Lightning's smoothing)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def valley_index(losses: list[float]) -> int:
    """fastai's `valley`: the longest decreasing run of `losses` (not necessarily contiguous), and the index
    1/3 + 1/6 of its length after its start."""
    lengths = [1] * len(losses)
    start, end = 0, 0
    for i in range(1, len(losses)):
        for j in range(i):
            if losses[i] < losses[j] and lengths[i] < lengths[j] + 1:
                lengths[i] = lengths[j] + 1
            if lengths[end] < lengths[i]:
                end, start = i, i - lengths[i]
    section = (end - start) / 3
    return max(0, start + int(section) + int(section / 2))


def bottom_index(losses: list[float], lrs: list[float], start: int, patience: float = BOTTOM_PATIENCE) -> int:
    """Smith's one-cycle peak: from `start` (the valley point), the last new low of `losses` before `lrs` grows by
    `patience` times without a new low."""
    best = start
    for i in range(start + 1, len(losses)):
        if losses[i] < losses[best]:
            best = i
        elif lrs[i] >= patience * lrs[best]:
            break
    return best


def steepest_index(losses: list[float]) -> int:
    """Lightning's rule: the most negative slope (central differences), skipping the first 10% of the points."""
    skip = max(1, len(losses) // 10)
    slopes = [(losses[i + 1] - losses[i - 1]) / 2 for i in range(skip, len(losses) - 1)]
    return skip + min(range(len(slopes)), key=slopes.__getitem__) if slopes else len(losses) // 2


@dataclass
class Sweep:
    """The sweep's record (what the JSON beside the plot holds)."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """The raw loss of each step (mean over ranks)."""
    smoothed: list[float] = field(default_factory=list)
    stopped: str = "reached --end-lr"
    rule: str = "valley"
    """Which rule gives the suggestion: `valley` or `bottom` (RULES: by optimizer)."""

    @property
    def valley(self) -> float:
        return self.lrs[valley_index(self.smoothed)]

    @property
    def bottom(self) -> float:
        return self.lrs[bottom_index(self.smoothed, self.lrs, valley_index(self.smoothed))]

    @property
    def suggestion(self) -> float:
        """The learning rate of the sweep's rule (see the module docstring)."""
        return self.bottom if self.rule == "bottom" else self.valley

    def record(self) -> dict:
        low = min(range(len(self.smoothed)), key=self.smoothed.__getitem__)
        return {**asdict(self), "suggestion": self.suggestion, "valley": self.valley, "bottom": self.bottom,
                "steepest": self.lrs[steepest_index(self.smoothed)], "minimum": self.lrs[low],
                "minimum_over_10": self.lrs[low] / 10}


def run_sweep(step: Callable[[float], float], lrs: list[float], rule: str = "valley",
              diverge: float = DIVERGE) -> Sweep:
    """Call `step(lr)` (one optimizer step at lr; returns the loss, the same on every rank) for each lr until the
    smoothed loss diverges or a loss is not finite; the suggestion follows `rule`."""
    sweep = Sweep(rule=rule)
    for lr in lrs:
        loss = step(lr)
        if not math.isfinite(loss):
            sweep.stopped = f"a non-finite loss at lr {lr:.3g}"
            break
        sweep.lrs.append(lr)
        sweep.losses.append(loss)
        sweep.smoothed = smooth(sweep.losses)
        if len(sweep.smoothed) > 1 and sweep.smoothed[-1] > diverge * min(sweep.smoothed):
            sweep.stopped = f"the smoothed loss passed {diverge:g}x its minimum at lr {lr:.3g}"
            break
    if len(sweep.lrs) < 2:
        raise ValueError(f"lr-find: the sweep stopped after {len(sweep.lrs)} step(s) ({sweep.stopped}); lower "
                         "--start-lr")
    return sweep


class SweepStep:
    """One optimizer step of the sweep at a given lr, as the training step takes it (accumulation, autocast, batch
    augmentation, L1 penalty, clipping); returns the loss averaged over the micro-batches and ranks."""

    def __init__(self, cfg, dist, model, optimizer, loss_fn, train_data, penalty):
        from pipeline.training.mixing import BatchAugment

        self.cfg, self.dist, self.model, self.optimizer = cfg, dist, model, optimizer
        self.loss_fn, self.penalty = loss_fn, penalty
        self.augment = BatchAugment(cfg.data.augment, cfg.train.seed)
        self.batches = self._endless(train_data)
        self.steps = 0

    @staticmethod
    def _endless(train_data):
        epoch = 0
        while True:
            train_data.set_position(epoch, 0)
            yield from train_data.loader
            epoch += 1

    def __call__(self, lr: float) -> float:
        import contextlib

        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        accelerator, window = self.dist.accelerator, self.cfg.train.grad_accum_steps
        total = torch.zeros((), device=self.dist.device)
        for micro in range(window):
            images, labels = next(self.batches)
            images, targets = self.augment(images.to(self.dist.device), labels.to(self.dist.device),
                                           (self.steps, 0, micro, self.dist.rank))
            if self.cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            sync = accelerator.no_sync(self.model) if micro < window - 1 else contextlib.nullcontext()
            with sync:
                with accelerator.autocast():
                    logits = self.model(images)
                    loss = self.loss_fn(logits.float(), targets.targets(logits.shape[-1]))
                self.dist.backward(self.penalty(loss) / window)
            total += loss.detach() / window
        self.steps += 1
        loss = float(self.dist.reduce_sum(total) / self.dist.world_size)  # the one host sync of a step
        if math.isfinite(loss):
            if self.cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
            self.dist.optimizer_step(self.optimizer)
        return loss
