"""k-fold cross-validation: `pipeline cv CONFIG folds=K`.

The samples of the train and val splits are pooled and cut into K stratified folds, seeded by cv.seed
(`pipeline.data.writer.stratify`): by class (scikit-learn's StratifiedKFold), by label set for task.type=multilabel
(iterative stratification, MultilabelStratifiedKFold over the multi-hot labels), by quantile bins of the first output
for task.type=regression (StratifiedKFold over at most 10 equal-count bins of at least K samples each; a shuffled
KFold, with a warning, when not even two such bins exist). Fold k trains on the other K-1 folds, validates on fold k
(best checkpoint, early stopping) and is tested on the untouched test split. Each fold gets its own
shards (`<cv.data_dir>/fold<k>`, written once, staged then renamed) and its own run folder
(`<run.output_dir>/<run.name>_cv<K>/fold<k>`), so folds can run as separate jobs (`cv.fold=k`, see
`slurm/cv.sbatch`). Whoever finishes the last fold writes `cv_summary.json`: mean ± std over folds of
each test metric. Fold shards hold the labels as the run reads them: `cls` for classification, else the source's
own label member (data.label_key is kept), so every fold trains with the config as given.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.config import Config
from pipeline.data.dataset.keys import TargetLabel
from pipeline.data.dataset.manifest import Manifest
from pipeline.data.writer.stratify import METHODS, assign_folds, multi_hot, strata
from pipeline.data.writer.subsets import write_split_shards
from pipeline.run_folder import CV_SUMMARY_FILE, fold_folder, fold_name
from pipeline.tracking.console import warn

SUMMARY_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc",  # classification
                   "map_macro", "f1_micro", "exact_match", "hamming_loss",  # multilabel
                   "mae", "rmse", "r2", "loss")  # regression; every task's loss
"""Test metrics summarised over folds (those every fold has)."""


def fold_assignment(labels: list[TargetLabel], folds: int, seed: int, task: str = "classification",
                    classes: Sequence[str] = ()) -> np.ndarray:
    """fold index of every sample (stratified for the task, shuffled with `seed`; see the module docstring), after
    the checks: more folds than samples, or than the smallest class has samples, are refused; a multilabel class
    in fewer samples than folds, or a regression set too small for bins, is warned about."""
    if folds > len(labels):
        raise ValueError(f"cv.folds={folds} is more than the {len(labels)} labelled samples of train+val")
    if task == "classification":
        counts = np.bincount(np.asarray(labels))
        if counts[counts > 0].min() < folds:
            raise ValueError(f"cv.folds={folds} is more than the smallest class has samples "
                             f"({int(counts[counts > 0].min())}) in train+val")
    elif task == "multilabel":
        _warn_rare_classes(classes, multi_hot(labels, len(classes)).sum(axis=0), folds)
    elif strata(labels, task, len(classes), min_count=folds) is None:
        warn(f"cv: the {len(labels)} regression targets of train+val cannot make two quantile bins of "
             f"{folds} samples each; the folds are shuffled, not stratified")
    return assign_folds(labels, folds, seed, task, len(classes))


def _warn_rare_classes(classes: Sequence[str], positives: np.ndarray, folds: int) -> None:
    """One line naming the classes with fewer positives than folds: some validation folds have none of them."""
    rare = [f"'{name}' ({int(n)})" for name, n in zip(classes, positives) if n < folds]
    if rare:
        shown = ", ".join(rare[:5]) + (f" and {len(rare) - 5} more" if len(rare) > 5 else "")
        warn(f"cv: {len(rare)} class(es) occur in fewer than cv.folds={folds} samples of train+val: {shown}; some "
             f"validation folds hold none of them (their average precision counts as 0 there)")


def _labelled(cfg: Config, manifest: Manifest, split: str) -> list[tuple[dict, TargetLabel]]:
    """(members, label) of every sample of a split with a usable label, read with the training stream's reader (the
    label member is left out for classification, which writes it as `cls`); samples without one are left out, with
    a warning."""
    from pipeline.data.dataset.resolve import read_options, sample_keys
    from pipeline.data.io.tar import tar_samples
    from pipeline.data.stream import shard_paths

    keys, options = sample_keys(cfg.data, manifest.classes, cfg.task), read_options(cfg.data)
    dropped = keys.member if cfg.task.type == "classification" else None
    shards = manifest.split(split).shards
    pairs, unusable = [], 0
    for url in shard_paths(cfg.data.root, [shard.name for shard in shards]):
        for sample in tar_samples(url, options=options):
            label, reason, _ = keys.label(sample, manifest.num_classes)
            if reason:
                unusable += 1
                continue
            pairs.append(({k: v for k, v in sample.items() if not k.startswith("__") and k != dropped}, label))
    if unusable:
        warn(f"cv: {unusable} {split} sample(s) without a usable label are left out of the folds")
    return pairs


def write_fold_shards(cfg: Config, fold: int, out: Path) -> Path:
    """Shards of one fold at `out` (kept if its manifest exists): train = other folds, val = this fold."""
    from pipeline.data.dataset.resolve import dataset_manifest

    if (out / "manifest.json").is_file():
        return out
    manifest = dataset_manifest(cfg.data, task=cfg.task)
    pool = _labelled(cfg, manifest, "train") + _labelled(cfg, manifest, "val")
    assignment = fold_assignment([label for _, label in pool], cfg.cv.folds, cfg.cv.seed, cfg.task.type,
                                 manifest.classes)
    splits = {"train": [p for p, f in zip(pool, assignment) if f != fold],
              "val": [p for p, f in zip(pool, assignment) if f == fold],
              "test": _labelled(cfg, manifest, "test")}
    write_split_shards(out, manifest.classes, splits, f"{manifest.source or cfg.data.root} fold {fold}/{cfg.cv.folds}",
                       task=cfg.task.type, label_key=fold_label_key(cfg), split_source=METHODS[cfg.task.type])
    return out


def fold_label_key(cfg: Config) -> str:
    """The data.label_key of the fold shards: `cls` (written by us) for classification, else the source's."""
    return "cls" if cfg.task.type == "classification" else cfg.data.label_key


def cv_root(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / f"{cfg.run.name}_cv{cfg.cv.folds}"


def fold_config(cfg: Config, fold: int) -> Config:
    from pipeline.data.dataset.resolve import uses_specs

    default_dir = cv_root(cfg) / "data" if uses_specs(cfg.data) else f"{cfg.data.root.rstrip('/')}_cv{cfg.cv.folds}"
    data_dir = Path(cfg.cv.data_dir or default_dir)
    fold_cfg = copy.deepcopy(cfg)
    fold_cfg.data.root = str(write_fold_shards(cfg, fold, data_dir / f"fold{fold}"))
    fold_cfg.data.auto_prepare_digits = False
    # The fold shards are ours (manifest, the same image members; labels as `fold_label_key` reads them).
    fold_cfg.data.train, fold_cfg.data.val, fold_cfg.data.test, fold_cfg.data.classes = [], [], [], []
    fold_cfg.data.label_key = fold_label_key(cfg)
    fold_cfg.run.output_dir, fold_cfg.run.name = str(cv_root(cfg)), fold_name(fold)
    fold_cfg.cv.fold = fold
    return fold_cfg


def summarize(cfg: Config) -> dict | None:
    """mean ± std over folds of each test metric, once every fold has test_metrics.json; else None."""
    root = cv_root(cfg)
    paths = [fold_folder(root, k).test_metrics for k in range(cfg.cv.folds)]
    if not all(p.is_file() for p in paths):
        return None
    per_fold = [json.loads(p.read_text()) for p in paths]
    summary: dict = {"folds": cfg.cv.folds, "seed": cfg.cv.seed, "metrics": {}}
    for key in SUMMARY_METRICS:
        values = [float(m[key]) for m in per_fold if m.get(key) is not None]
        if len(values) == len(per_fold):
            summary["metrics"][key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values),
                                       "per_fold": values}
    (root / CV_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_lines(summary: dict) -> list[str]:
    return [f"{summary['folds']}-fold CV  test/{key}: {m['mean']:.4f} ± {m['std']:.4f}  "
            f"(folds: {', '.join(f'{v:.4f}' for v in m['per_fold'])})" for key, m in summary["metrics"].items()]


def run_cv(cfg: Config) -> dict | None:
    """Run cv.fold (or every fold when -1); return the summary if all folds are done."""
    from pipeline.commands.train import train
    from pipeline.run.data import load_manifest

    load_manifest(cfg)  # build the bundled digits shards if needed; check the splits exist
    folds = range(cfg.cv.folds) if cfg.cv.fold < 0 else [cfg.cv.fold]
    for fold in folds:
        train(fold_config(cfg, fold))
    return summarize(cfg)


__all__ = ["fold_assignment", "fold_config", "run_cv", "summarize", "summary_lines", "write_fold_shards"]
