"""Digits transfer experiment: pretrain on digits 0-4, fine-tune on 5-9 with 20 training images per class.

    python -m pipeline.experiments.digits_transfer --seeds 0 1 2

1. Shards: digits 0-4 (70/15/15 split; pretraining uses all its training images) and digits 5-9
   with exactly `--shots` training and `--val-shots` validation images per class, every other
   5-9 image in the test split.
2. Pretrain `configs/digits_transfer.yaml`'s network on 0-4 once.
3. For each seed, on 5-9: (a) scratch, (b) feature extraction (frozen pretrained backbone, new
   head), (c) gradual unfreezing with layer-wise learning-rate decay; same epochs and batch size.
4. Print and write `<out>/transfer_results.json` and a markdown table of test accuracy mean ± std.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.config import Config, load_config
from pipeline.data.subsets import write_split_shards

FROM_SCRATCH = ["finetune.weights=''", "finetune.freeze=full", "finetune.layer_decay=1.0"]
METHODS = {
    "scratch": FROM_SCRATCH,
    # A linear probe on frozen features needs a larger step than training everything from scratch.
    "feature_extraction": ["finetune.freeze=feature_extraction", "finetune.layer_decay=1.0", "optim.lr=0.03"],
    # Head at 0.01; each group nearer the input gets 0.3x the lr of the next; one more group every 5 epochs.
    "gradual_unfreezing": ["finetune.freeze=gradual", "finetune.unfreeze_every=5", "finetune.layer_decay=0.3",
                           "optim.lr=0.01"],
}


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), digits.target


def build_transfer_shards(root: Path, shots: int = 20, val_shots: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """`root/source_0to4` and `root/target_5to9_<shots>shot`; kept if their manifests exist already."""
    from pipeline.data.shards import stratified_split

    source, target = root / "source_0to4", root / f"target_5to9_{shots}shot"
    images, labels = digits_images()
    if not (source / "manifest.json").is_file():
        keep = np.flatnonzero(labels < 5)
        split = stratified_split(labels[keep], (0.7, 0.15, 0.15), seed)
        write_split_shards(source, [str(c) for c in range(5)],
                           {name: [({"png": _png(images[keep[i]])}, int(labels[keep[i]])) for i in idx]
                            for name, idx in zip(("train", "val", "test"), split)}, "sklearn digits 0-4")
    if not (target / "manifest.json").is_file():
        rng = np.random.default_rng(seed)
        train, val, test = [], [], []
        for label in range(5, 10):
            idx = rng.permutation(np.flatnonzero(labels == label))
            train += list(idx[:shots])
            val += list(idx[shots:shots + val_shots])
            test += list(idx[shots + val_shots:])
        splits = {name: [({"png": _png(images[i])}, int(labels[i]) - 5) for i in rng.permutation(np.array(idx))]
                  for name, idx in (("train", train), ("val", val), ("test", test))}
        write_split_shards(target, [str(c) for c in range(5, 10)], splits, f"sklearn digits 5-9, {shots}/class")
    return source, target


def pretrain_config(base: Config | str, source: Path, out: Path, overrides: Sequence[str] = ()) -> Config:
    return load_config(base, [f"data.root={source}", f"run.output_dir={out}", "run.name=pretrain_0to4",
                              "checkpoint.resume=never", *FROM_SCRATCH, *overrides])


def method_config(base: str, method: str, target: Path, pretrained: Path, out: Path, seed: int,
                  overrides: Sequence[str] = ()) -> Config:
    weights = [] if method == "scratch" else [f"finetune.weights={pretrained}"]
    return load_config(base, [f"data.root={target}", f"run.output_dir={out}", f"run.name={method}-seed{seed}",
                              f"train.seed={seed}", "checkpoint.resume=never", *weights, *METHODS[method],
                              *overrides])


def run_experiment(base: str, out: Path, seeds: Sequence[int], shots: int = 20, pretrain_epochs: int = 6,
                   epochs: int = 20, methods: Sequence[str] = tuple(METHODS), overrides: Sequence[str] = ()) -> dict:
    """Everything above; returns {method: {"accuracy": [...], "mean", "std", "seconds"}}."""
    from pipeline.training.run import train

    out.mkdir(parents=True, exist_ok=True)
    source, target = build_transfer_shards(out / "data", shots)
    started = time.perf_counter()
    train(pretrain_config(base, source, out, [f"train.epochs={pretrain_epochs}", *overrides]))
    pretrain_seconds = time.perf_counter() - started
    pretrained = out / "pretrain_0to4"
    results: dict = {"shots": shots, "epochs": epochs, "pretrain_epochs": pretrain_epochs,
                     "pretrain_seconds": round(pretrain_seconds, 1), "methods": {}}
    for method in methods:
        accuracies, seconds = [], []
        for seed in seeds:
            started = time.perf_counter()
            cfg = method_config(base, method, target, pretrained, out, seed, [f"train.epochs={epochs}", *overrides])
            accuracies.append(float(train(cfg)["accuracy"]))
            seconds.append(time.perf_counter() - started)
        results["methods"][method] = {
            "accuracy": accuracies, "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seconds_per_run": round(statistics.fmean(seconds), 1)}
    (out / "transfer_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "transfer_results.md").write_text("\n".join(table(results)) + "\n")
    return results


def table(results: dict) -> list[str]:
    rows = ["| method | test accuracy (mean ± std) | per seed | s/run |", "|---|---|---|---|"]
    for method, r in results["methods"].items():
        per_seed = ", ".join(f"{a:.3f}" for a in r["accuracy"])
        rows.append(f"| {method} | {100 * r['mean']:.1f} ± {100 * r['std']:.1f} % | {per_seed} | "
                    f"{r['seconds_per_run']} |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits_transfer.yaml")
    parser.add_argument("--out", default="runs/digits_transfer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=20)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    args = parser.parse_args(argv)
    results = run_experiment(args.config, Path(args.out), args.seeds, args.shots, args.pretrain_epochs, args.epochs,
                             overrides=args.overrides)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
