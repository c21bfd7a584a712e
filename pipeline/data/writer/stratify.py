"""Cut samples into train/val/test splits or k folds that keep each split's label distribution: one place per task.

- `classification`: scikit-learn's stratified splitters over the class index (`train_test_split(stratify=...)`,
  `StratifiedKFold`).
- `multilabel`: iterative stratification of the label sets (Sechidis et al. 2011, the `iterative-stratification`
  package: `MultilabelStratifiedShuffleSplit`, `MultilabelStratifiedKFold`) over the multi-hot matrix, so every
  class, rare ones included, keeps its share of positives in every split or fold.
- `regression`: the stratified splitters over quantile bins of the first output (`quantile_bins`: at most
  `MAX_BINS` equal-count bins, each with enough samples for the splitter); a set too small for two such bins is
  split shuffled, unstratified (`strata` returns None; the caller says so).

Labels come as `pipeline.data.dataset.keys.SampleKeys.label` gives them: a class index, a tuple of class indices, or a
tuple of floats. Every splitter is seeded; the same labels, fractions and seed give the same split.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from pipeline.data.dataset.keys import TargetLabel

MAX_BINS = 10
"""Regression: the most quantile bins of the first output that a split or fold assignment stratifies by."""
METHODS = {"classification": "stratified", "multilabel": "iterative", "regression": "binned"}
"""How a task's samples are split (the manifest's `split_source`): by class, by label set, by quantile bins."""


def multi_hot(labels: Sequence[TargetLabel], num_classes: int) -> np.ndarray:
    """Samples x classes, True where the sample has the class (labels: tuples of class indices)."""
    hot = np.zeros((len(labels), num_classes), dtype=bool)
    for row, indices in enumerate(labels):
        hot[row, list(indices)] = True
    return hot


def quantile_bins(values: np.ndarray, max_bins: int, min_count: int) -> Optional[np.ndarray]:
    """The bin (0..B-1) of each value: the most equal-count bins (B <= max_bins, cut at quantiles) that each hold at
    least `min_count` values; None when not even two such bins exist (too few samples, or one value repeated)."""
    values = np.asarray(values, dtype=float)
    for count in range(min(max_bins, len(values) // max(min_count, 1)), 1, -1):
        edges = np.quantile(values, np.linspace(0, 1, count + 1)[1:-1])
        found, bins, sizes = np.unique(np.searchsorted(edges, values, side="right"), return_inverse=True,
                                       return_counts=True)
        if len(found) >= 2 and sizes.min() >= min_count:
            return bins
    return None


def strata(labels: Sequence[TargetLabel], task: str, num_classes: int, max_bins: int = MAX_BINS,
           min_count: int = 2) -> Optional[np.ndarray]:
    """What the splitter stratifies by: class indices, the multi-hot matrix, or the first output's quantile bins
    (None: too few samples for two bins; split unstratified)."""
    if task == "multilabel":
        return multi_hot(labels, num_classes)
    if task == "regression":
        return quantile_bins(np.array([label[0] for label in labels]), max_bins, min_count)
    return np.asarray(labels)


def _holdout(indices: np.ndarray, labels: Sequence[TargetLabel], share: float, seed: int, task: str,
             num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of `indices`: `share` of them held out, stratified for the task, seeded, each shuffled."""
    from sklearn.model_selection import train_test_split

    subset = [labels[i] for i in indices]
    if task == "multilabel":
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=share, random_state=seed)
        kept, held = next(splitter.split(np.zeros(len(subset)), multi_hot(subset, num_classes)))
        rng = np.random.default_rng(seed)
        return rng.permutation(indices[kept]), rng.permutation(indices[held])
    held_count = math.ceil(share * len(subset))  # as scikit-learn rounds test_size
    by = strata(subset, task, num_classes, max_bins=min(MAX_BINS, held_count, len(subset) - held_count))
    kept, held = train_test_split(indices, test_size=share, stratify=by, random_state=seed)
    return kept, held


def stratified_split(labels: Sequence[TargetLabel], fractions: Sequence[float], seed: int,
                     task: str = "classification", num_classes: int = 0) -> list[np.ndarray]:
    """Indices of train/val/test by `fractions`, stratified for the task (see the module docstring), each shuffled:
    the held-out share first, then val and test from it."""
    train_f, val_f, test_f = fractions
    indices = np.arange(len(labels))
    holdout = val_f + test_f
    if holdout == 0:
        return [np.random.default_rng(seed).permutation(indices), indices[:0], indices[:0]]
    train_idx, rest_idx = _holdout(indices, labels, holdout, seed, task, num_classes)
    if val_f == 0 or test_f == 0:
        empty = indices[:0]
        return [train_idx, rest_idx, empty] if test_f == 0 else [train_idx, empty, rest_idx]
    val_idx, test_idx = _holdout(rest_idx, labels, test_f / holdout, seed, task, num_classes)
    return [train_idx, val_idx, test_idx]


def fold_splitter(labels: Sequence[TargetLabel], folds: int, seed: int, task: str, num_classes: int):
    """(a scikit-learn splitter of `folds` seeded, shuffled folds, what it stratifies by): StratifiedKFold over the
    classes or the quantile bins (each bin at least `folds` samples), MultilabelStratifiedKFold over the multi-hot
    matrix, or a shuffled KFold when a regression set is too small for two bins."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if task == "multilabel":
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        return MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), multi_hot(labels,
                                                                                                      num_classes)
    by = strata(labels, task, num_classes, min_count=folds)
    if by is None:
        return KFold(n_splits=folds, shuffle=True, random_state=seed), None
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), by


def assign_folds(labels: Sequence[TargetLabel], folds: int, seed: int, task: str = "classification",
                 num_classes: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every sample, by `fold_splitter`."""
    splitter, by = fold_splitter(labels, folds, seed, task, num_classes)
    assignment = np.empty(len(labels), dtype=np.int64)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), by)):
        assignment[held] = fold
    return assignment


def proportion_deviation(hot: np.ndarray, assignment: np.ndarray) -> float:
    """How far the folds' label proportions stray from the whole set's: the mean over folds and classes of
    |share of the fold's samples with the class - share of all samples with it| (0: every fold alike)."""
    hot = np.asarray(hot, dtype=float)
    overall = hot.mean(axis=0)
    return float(np.mean([np.abs(hot[assignment == fold].mean(axis=0) - overall)
                          for fold in np.unique(assignment)]))


__all__ = ["MAX_BINS", "METHODS", "assign_folds", "fold_splitter", "multi_hot", "proportion_deviation",
           "quantile_bins", "strata", "stratified_split"]
