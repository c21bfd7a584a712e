"""Evaluate a model over a split: every sample counted exactly once across ranks."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pipeline.evaluation.metrics import ClassificationMetrics


def evaluate(model: nn.Module, batches: Iterable, loss_fn: nn.Module, metrics: ClassificationMetrics,
             device: torch.device, autocast, channels_last: bool = False) -> dict:
    """Run `model` in eval mode under inference mode over `batches`; return synced metrics.

    `model` should be the unwrapped module: no DDP collective runs in the loop, so ranks holding a
    different number of evaluation batches never wait on each other.
    """
    was_training = model.training
    model.eval()
    metrics.reset()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    with torch.inference_mode():
        for images, labels in batches:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            metrics.update(logits.float(), labels, loss_fn(logits.float(), labels))
    model.train(was_training)
    return metrics.compute()
