"""Diagnosis: a run's history and data, explained in plain sentences with evidence and remedies."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.commands.diagnose.rules import Chance, Finding, diagnose
from pipeline.run_folder import RunFolder


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's epoch records from metrics.jsonl (one-line error if the folder is not a run)."""
    run_dir = Path(run_dir)
    path = RunFolder(run_dir).metrics
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' has no {path.name}; is it a run folder that trained an epoch?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mixes(cfg) -> bool:
    """Whether the run trained on MixUp/CutMix targets."""
    return cfg.data.augment.mixup_alpha > 0 or cfg.data.augment.cutmix_alpha > 0


def task_chance(cfg, classes) -> Chance | int:
    """The loss an untrained model scores, against which the rules judge the training loss: cross-entropy's
    ln(classes) (classification, given as the number of classes); BCE's ln(2) per class for a sigmoid at 0.5
    (multilabel); for regression the loss of predicting the training mean on standardised targets (a standard
    normal target: mse 1, l1 sqrt(2/pi), huber by task.huber_delta, computed on its quantiles)."""
    if cfg.task.type == "multilabel":
        return Chance(math.log(2), "ln(2) (BCE of a sigmoid at 0.5, per class)")
    if cfg.task.type == "regression":
        import torch

        from pipeline.training.losses import RegressionLoss

        quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.0005, 0.9995, 1000)).unsqueeze(1)
        value = float(RegressionLoss(cfg.task.loss, [0.0], [1.0], cfg.task.huber_delta)(torch.zeros_like(quantiles),
                                                                                         quantiles))
        return Chance(value, f"{value:.4f} ({cfg.task.loss} of predicting the training mean, standardised targets)")
    return len(classes)


def diagnose_run(run_dir: str | Path) -> list[Finding]:
    """Diagnose a run folder from metrics.jsonl, its data manifest and, if present, per-class test metrics."""
    from pipeline.data.dataset.resolve import dataset_manifest
    from pipeline.run.loaded import load_run_config

    run_dir = Path(run_dir)
    history = read_history(run_dir)
    cfg = load_run_config(run_dir)
    counts, num_classes = None, None
    try:
        manifest = dataset_manifest(cfg.data, task=cfg.task)
        counts, num_classes = manifest.split("train").class_counts, manifest.num_classes
    except (FileNotFoundError, ValueError, KeyError):
        pass  # diagnose from the history alone when the shards have moved
    per_class = None
    test_path = RunFolder(run_dir).test_metrics
    if test_path.is_file():
        test = json.loads(test_path.read_text())
        per_class = test.get("per_class")
        if "confusion_matrix" in test:
            import torch

            from pipeline.evaluation.analysis import per_class_metrics

            confusion = torch.tensor(test["confusion_matrix"])
            classes = [str(i) for i in range(len(confusion))] if counts is None else list(counts)
            per_class = per_class or per_class_metrics(confusion, classes)
            num_classes = num_classes or len(confusion)
    if cfg.task.type != "classification":  # no per-class test table; regression has no class counts
        chance = task_chance(cfg, list(counts or ()))
        return diagnose(history, chance, counts if cfg.task.type == "multilabel" else None, None, lr=cfg.optim.lr,
                        mixed_targets=mixes(cfg))
    return diagnose(history, num_classes or 2, counts, per_class, lr=cfg.optim.lr, mixed_targets=mixes(cfg))


def format_findings(findings: list[Finding]) -> str:
    """Findings as plain text: the sentence, then evidence and remedies as indented bullets."""
    lines = []
    for finding in findings:
        lines.append(f"[{finding.kind}] {finding.summary}")
        lines += [f"    evidence: {e}" for e in finding.evidence]
        lines += [f"    remedy:   {r}" for r in finding.remedies]
    return "\n".join(lines)


__all__ = ["Chance", "Finding", "diagnose", "diagnose_run", "format_findings", "mixes", "read_history", "task_chance"]
