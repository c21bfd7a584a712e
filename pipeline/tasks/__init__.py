"""What the model predicts per image (task.type): the one place that knows what a label means.

- `classification` (default): one class per image (`Classification`);
- `multilabel`: any set of the classes (`Multilabel`);
- `regression`: task.num_outputs numbers (`Regression`).

`build_task(cfg, manifest)` gives the run's `Task`: its loss, metrics, training score, what its outputs mean, what
predict and evaluate report, and its state (thresholds, target mean/std) kept in checkpoints, <run>/task.json and
export sidecars. The loop, the evaluation and the commands ask it; none of them branches on task.type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.config.schema import Config, OptimConfig, TaskConfig
from pipeline.data.balance import auto_class_weights, class_counts
from pipeline.data.dataset.manifest import Manifest
from pipeline.run_folder import RunFolder
from pipeline.tasks.base import Task
from pipeline.tasks.classification import Classification
from pipeline.tasks.multilabel import Multilabel, pos_weights
from pipeline.tasks.regression import Regression


def build_task(cfg: Config, manifest: Manifest) -> Task:
    """The task of a run on this data (regression: standardised with the training split's target statistics)."""
    if cfg.task.type == "multilabel":
        return Multilabel(manifest.classes, cfg.task.threshold)
    if cfg.task.type == "regression":
        return Regression(manifest.classes, cfg.task, manifest.splits["train"].targets)
    return Classification(manifest.classes, cfg.optim)


def class_weights(cfg: Config, manifest: Manifest) -> Sequence[float] | None:
    """The loss's class weights: optim.class_weights, or imbalance.class_weights=auto from the training counts
    (classification: n / (classes x count); multilabel: BCE's pos_weight, negatives / positives per class)."""
    if cfg.imbalance.class_weights != "auto":
        return cfg.optim.class_weights
    counts = class_counts(manifest, "train")
    if cfg.task.type == "multilabel":
        return pos_weights(counts, manifest.splits["train"].num_samples)
    return auto_class_weights(counts)


def task_from_state(classes: Sequence[str], state: dict | None) -> Task:
    """The task an export recorded (its sidecar's `task`; absent: classification), for predicting without the run."""
    kind = (state or {}).get("type", "classification")
    if kind == "multilabel":
        task: Task = Multilabel(classes, "0.5")
    elif kind == "regression":
        task = Regression(classes, TaskConfig(type="regression", standardize=False), {})
    else:
        return Classification(classes, OptimConfig())
    task.load_state(state or {})
    return task


def write_task(task: Task, run_dir: Path) -> None:
    """<run>/task.json for a multilabel or regression run (a classifier's run folder stays as it was)."""
    if task.type != "classification":
        RunFolder(run_dir).task.write_text(json.dumps(task.state(), indent=2) + "\n")


def load_task(cfg: Config, manifest: Manifest, run_dir: Path) -> Task:
    """A finished run's task, with the state it stored (tuned thresholds, the target mean/std it trained with)."""
    task = build_task(cfg, manifest)
    path = RunFolder(run_dir).task
    if path.is_file():
        task.load_state(json.loads(path.read_text()))
    return task


__all__ = ["Task", "build_task", "class_weights", "load_task", "task_from_state", "write_task"]
