"""`pipeline evaluate RUN_DIR`: re-evaluate a finished run's best weights on a split, with per-class
precision/recall/F1/support, top-k accuracy, calibration (ECE) and the most-confused class pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.data.samples import faults
from pipeline.distributed import Dist
from pipeline.evaluation.evaluate import collect_predictions, evaluate, evaluation_record
from pipeline.evaluation.tta import tta_views, with_tta
from pipeline.run.loaded import load_run, load_run_config
from pipeline.tasks import class_weights


def _gather(probs: torch.Tensor, labels: torch.Tensor, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's predictions on every rank (ranks may hold different numbers of samples)."""
    if dist.world_size == 1:
        return probs, labels
    parts = dist.gather_object((probs, labels))
    return torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])


def evaluate_run(run_dir: str | Path, split: str = "test", tta: str | None = None,
                 checkpoint: str | None = None) -> dict:
    """The run's best weights (EMA when it kept them; or those of the checkpoint folder `checkpoint`) on `split`, with
    test-time augmentation `tta` (None: the run's eval.tta)."""
    run = load_run(run_dir, checkpoint)
    tta = run.cfg.eval.tta if tta is None else tta
    tta_views(torch.zeros(1, 1, 2, 2), tta)  # an unknown mode: one line before any data is read
    model, task = with_tta(run.model, tta), run.task
    data = run.split_loader(split)
    metrics = evaluate(model, data.loader, task.build_loss(class_weights(run.cfg, run.manifest)).to(run.device),
                       task.metrics(run.device), run.device, run.dist.accelerator.autocast, run.cfg.model.channels_last)
    counts = run.dist.gather_rows(data.bad_samples.total).sum(dim=0)  # bad samples are left out of the metrics
    outputs, labels = _gather(*collect_predictions(model, run.loader(split), run.device, run.dist.accelerator.autocast,
                                                   run.cfg.model.channels_last, task.outputs), run.dist)
    return {**evaluation_record(metrics, faults.num_skipped(counts), faults.as_dict(counts), task.test_keys),
            **task.analyse(outputs, labels), "weights": run.weights, "tta": tta, "checkpoint": run.checkpoint.name,
            **({"task": task.state()} if task.type != "classification" else {})}


__all__ = ["evaluate_run", "load_run_config"]
