"""Diagnosis: a run's history and data, explained in plain sentences with evidence and remedies."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.commands.diagnose.rules import Finding, diagnose


def read_history(run_dir: str | Path) -> list[dict]:
    """The run's epoch records from metrics.jsonl (one-line error if the folder is not a run)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' has no metrics.jsonl; is it a run folder that trained an epoch?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mixes(cfg) -> bool:
    """Whether the run trained on MixUp/CutMix targets."""
    return cfg.data.augment.mixup_alpha > 0 or cfg.data.augment.cutmix_alpha > 0


def diagnose_run(run_dir: str | Path) -> list[Finding]:
    """Diagnose a run folder from metrics.jsonl, its data manifest and, if present, per-class test metrics."""
    from pipeline.data.dataset import dataset_manifest
    from pipeline.evaluation.loaded import load_run_config

    run_dir = Path(run_dir)
    history = read_history(run_dir)
    cfg = load_run_config(run_dir)
    counts, num_classes = None, None
    try:
        manifest = dataset_manifest(cfg.data)
        counts, num_classes = manifest.split("train").class_counts, manifest.num_classes
    except (FileNotFoundError, ValueError, KeyError):
        pass  # diagnose from the history alone when the shards have moved
    per_class = None
    test_path = run_dir / "test_metrics.json"
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
    return diagnose(history, num_classes or 2, counts, per_class, lr=cfg.optim.lr, mixed_targets=mixes(cfg))


def format_findings(findings: list[Finding]) -> str:
    """Findings as plain text: the sentence, then evidence and remedies as indented bullets."""
    lines = []
    for finding in findings:
        lines.append(f"[{finding.kind}] {finding.summary}")
        lines += [f"    evidence: {e}" for e in finding.evidence]
        lines += [f"    remedy:   {r}" for r in finding.remedies]
    return "\n".join(lines)


__all__ = ["Finding", "diagnose", "diagnose_run", "format_findings", "mixes", "read_history"]
