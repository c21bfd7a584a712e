"""Evaluate a model over a split: every sample counted exactly once across ranks. The one evaluation loop."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from pipeline.data.samples.faults import SKIP_REASONS
from pipeline.evaluation.metrics import ClassificationMetrics

TEST_METRIC_KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "confusion_matrix",
                    "num_samples")
"""The metrics a test (or re-)evaluation records, with the loss."""


def predict_batches(model: nn.Module, batches: Iterable, device: torch.device, autocast=None,
                    channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float logits, labels) on `device` per batch, the model in eval mode under inference mode (then restored).

    `model` should be the unwrapped module: no DDP collective runs in the loop, so ranks holding a
    different number of evaluation batches never wait on each other. Without `autocast`, no autocast.
    """
    was_training = model.training
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        with torch.inference_mode():
            for images, labels in batches:
                images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                    logits = model(images)
                yield logits.float(), labels
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, batches: Iterable, loss_fn: nn.Module, metrics: ClassificationMetrics,
             device: torch.device, autocast, channels_last: bool = False) -> dict:
    """Run `model` over `batches` (see `predict_batches`); return synced metrics."""
    metrics.reset()
    for logits, labels in predict_batches(model, batches, device, autocast, channels_last):
        metrics.update(logits, labels, loss_fn(logits, labels))
    return metrics.compute()


def collect_predictions(model: nn.Module, batches: Iterable, device: torch.device,
                        autocast=None, channels_last: bool = False, outputs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (N, C) and labels (N,) on the CPU (see `predict_batches`); `outputs`: what turns logits
    into what they mean instead of the softmax (a task's `outputs`: sigmoid, un-standardised values)."""
    probs, labels = [], []
    for logits, target in predict_batches(model, batches, device, autocast, channels_last):
        probs.append((outputs(logits) if outputs is not None else logits.softmax(dim=-1)).cpu())
        labels.append(target.cpu())
    return torch.cat(probs), torch.cat(labels)


def evaluation_record(metrics: dict, num_skipped: int, skipped: dict[str, int],
                      keys: tuple[str, ...] = TEST_METRIC_KEYS) -> dict:
    """What a test (or re-)evaluation records: the metrics (`keys`: the task's, see `pipeline.tasks`), the loss, and
    the bad samples left out, by reason."""
    return {**{k: metrics[k] for k in (*keys, "loss")}, "num_skipped": num_skipped,
            "skipped": {r: skipped[r] for r in SKIP_REASONS}}
