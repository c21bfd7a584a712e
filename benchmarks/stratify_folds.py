"""How evenly `pipeline cv` spreads labels over folds: our stratified folds against a shuffled KFold.

    python benchmarks/stratify_folds.py [--samples 1000] [--classes 20] [--folds 5] [--seeds 10]

Multi-label: a synthetic long-tailed tag set (`tag_set`): `--samples` images, `--classes` classes whose prevalence
falls as 0.4 / rank (0.4, 0.2, 0.13, ... 0.02 for 20 classes), each drawn independently, plus the rarest class
forced to exactly `--folds` positives. Regression: one target drawn log-normally (skewed, as prices or counts are).
For each seed, the folds of `pipeline.commands.cv.fold_assignment` (iterative stratification; quantile bins) and of
scikit-learn's `KFold(shuffle=True)` are scored by `pipeline.data.writer.stratify.proportion_deviation` (the mean over
folds and classes of |a fold's share of positives - the whole set's|), the folds that miss a class, and (regression)
the mean |fold mean - overall mean| in standard deviations. Writes benchmarks/results/stratify_folds.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, environment, write_json  # noqa: E402


def tag_set(samples: int, classes: int, folds: int, seed: int) -> list[tuple[int, ...]]:
    """Label sets of a long-tailed multi-label set; the last class has exactly `folds` positives."""
    rng = np.random.default_rng(seed)
    hot = rng.random((samples, classes)) < 0.4 / np.arange(1, classes + 1)
    hot[:, -1] = False
    hot[rng.choice(samples, folds, replace=False), -1] = True
    return [tuple(np.flatnonzero(row)) for row in hot]


def shuffled_folds(count: int, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import KFold

    assignment = np.empty(count, dtype=np.int64)
    for fold, (_, held) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(np.zeros(count))):
        assignment[held] = fold
    return assignment


def missing(hot: np.ndarray, assignment: np.ndarray) -> int:
    """(fold, class) pairs where the fold holds none of a class the whole set has."""
    present = hot.any(axis=0)
    return int(sum((~hot[assignment == fold].any(axis=0) & present).sum() for fold in np.unique(assignment)))


def mean_shift(values: np.ndarray, assignment: np.ndarray) -> float:
    """Mean over folds of |fold mean - overall mean|, in standard deviations of the values."""
    return float(np.mean([abs(values[assignment == f].mean() - values.mean()) for f in np.unique(assignment)])
                 / values.std())


def measure(args) -> dict:
    from pipeline.commands.cv import fold_assignment
    from pipeline.data.writer.stratify import multi_hot, proportion_deviation

    names = [f"c{i}" for i in range(args.classes)]
    rows: dict[str, list[float]] = {key: [] for key in ("iterative", "shuffled", "iterative_missing",
                                                        "shuffled_missing", "binned_shift", "shuffled_shift")}
    for seed in range(args.seeds):
        labels = tag_set(args.samples, args.classes, args.folds, seed)
        hot = multi_hot(labels, args.classes)
        ours = fold_assignment(labels, args.folds, seed, "multilabel", names)
        plain = shuffled_folds(len(labels), args.folds, seed)
        rows["iterative"].append(proportion_deviation(hot, ours))
        rows["shuffled"].append(proportion_deviation(hot, plain))
        rows["iterative_missing"].append(missing(hot, ours))
        rows["shuffled_missing"].append(missing(hot, plain))
        values = np.random.default_rng(seed).lognormal(0.0, 1.0, args.samples)
        binned = fold_assignment([(float(v),) for v in values], args.folds, seed, "regression", ["target"])
        rows["binned_shift"].append(mean_shift(values, binned))
        rows["shuffled_shift"].append(mean_shift(values, shuffled_folds(args.samples, args.folds, seed)))
    return {key: {"mean": statistics.fmean(v), "per_seed": v} for key, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    results = measure(args)
    print(f"{args.samples} samples, {args.classes} classes, {args.folds} folds, {args.seeds} seeds (means)")
    print(f"label-proportion deviation: iterative {results['iterative']['mean']:.5f}, "
          f"shuffled KFold {results['shuffled']['mean']:.5f}")
    print(f"(fold, class) pairs with no positive: iterative {results['iterative_missing']['mean']:.1f}, "
          f"shuffled KFold {results['shuffled_missing']['mean']:.1f}")
    print(f"regression fold-mean shift (std units): binned {results['binned_shift']['mean']:.4f}, "
          f"shuffled KFold {results['shuffled_shift']['mean']:.4f}")
    write_json({"args": vars(args), "results": results, "environment": environment()},
               ROOT / "benchmarks" / "results" / "stratify_folds.json")


if __name__ == "__main__":
    main()
