"""CIFAR-10 transfer benchmark: pretrain on classes 0-4, fine-tune on 5-9 with few labelled images per class.

    python benchmarks/cifar_transfer.py --data ../shared/datasets/cifar10-jpg.tar.gz --shots 20 100 --seeds 0 1 2

1. Shards (extracted once into `--cache`, never into the repository): the source, all training images
   of classes 0-4 (airplane, automobile, bird, cat, deer) with 10% carved off for validation; for each
   `--shots` value and seed, a target set of classes 5-9 (dog, frog, horse, ship, truck) with exactly
   `shots` training images per class drawn with that seed, 10 validation images per class (reported,
   never used to pick weights: every method is tested with its final weights), and as the test split
   the official CIFAR-10 test images of classes 5-9 (5,000).
2. Pretrain `configs/cifar10_transfer.yaml`'s network on the source once.
3. For each shots value and seed, on the target: (a) scratch, (b) feature extraction (frozen pretrained
   backbone, new head), (c) full fine-tuning with discriminative (layer-wise decayed) learning rates,
   (d) gradual unfreezing; the same epochs, batch size and augmentation for all four.
4. Print and write `<out>/transfer_results.json`, a markdown table of test accuracy mean ± std and
   `<out>/transfer_results.png` (accuracy against images per class, one line per method).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.transfer import FROM_SCRATCH, add_arguments, add_run, finish, parse_arguments, pretrain_config, table  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.writer.subsets import write_split_shards  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SOURCE, TARGET = CLASSES[:5], CLASSES[5:]
VAL_SHOTS = 10
PRETRAIN = ["train.batch_size=128"]  # 22,500 images: a larger batch than the few-shot runs

METHODS = {
    "scratch": FROM_SCRATCH,
    # A linear probe on frozen features takes a larger step than training everything.
    "feature_extraction": ["finetune.freeze=feature_extraction", "finetune.layer_decay=1.0", "optim.lr=0.01"],
    # Every group trains from the start; each group nearer the input gets half the lr of the next.
    "discriminative_lr": ["finetune.freeze=full", "finetune.layer_decay=0.5"],
    # The head first, then one more group every 2 epochs, with the same layer-wise decay.
    "gradual_unfreezing": ["finetune.freeze=gradual", "finetune.unfreeze_every=2", "finetune.layer_decay=0.5"],
}


def cifar10_folder(data: Path, cache: Path) -> Path:
    """The folder holding `train/<class>/` and `test/<class>/`: `data` itself, or the archive extracted into `cache`."""
    if data.is_dir():
        return data
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such CIFAR-10 archive or folder (see ../shared/datasets/README.md)")
    folder = cache / "cifar10-jpg"
    if not (folder / "test" / TARGET[-1]).is_dir():
        staging = cache / "cifar10-jpg.partial"
        staging.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data) as archive:
            archive.extractall(staging, filter="data")
        staging.replace(folder)
    return folder


def _images(folder: Path, split: str, name: str) -> list[Path]:
    files = sorted((folder / split / name).glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"{folder / split / name}: no .jpg images")
    return files


def _samples(files: Sequence[Path], label: int) -> list[tuple[dict[str, bytes], int]]:
    return [({"jpg": f.read_bytes()}, label) for f in files]


def _shuffled(samples: list, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order]


def build_source(folder: Path, out: Path, per_class: int = 0, seed: int = 0) -> Path:
    """Classes 0-4: training images (all, or `per_class`) with 10% for validation; their official test images."""
    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for label, name in enumerate(SOURCE):
        files = [Path(p) for p in rng.permutation(_images(folder, "train", name))]
        files = files[:per_class] if per_class else files
        cut = len(files) // 10
        val += _samples(files[:cut], label)
        train += _samples(files[cut:], label)
        test += _samples(_images(folder, "test", name), label)
    write_split_shards(out, SOURCE, {"train": _shuffled(train, seed), "val": val, "test": test},
                       f"CIFAR-10 classes 0-4 from {folder}", max_samples=1000)
    return out


def build_target(folder: Path, out: Path, shots: int, seed: int, test_per_class: int = 0) -> Path:
    """Classes 5-9: `shots` training and VAL_SHOTS validation images per class drawn with `seed`; official test."""
    if (out / "manifest.json").is_file():
        return out
    rng = np.random.default_rng(1000 + seed)
    train, val, test = [], [], []
    for label, name in enumerate(TARGET):
        files = [Path(p) for p in rng.permutation(_images(folder, "train", name))]
        train += _samples(files[:shots], label)
        val += _samples(files[shots:shots + VAL_SHOTS], label)
        official = _images(folder, "test", name)
        test += _samples(official[:test_per_class] if test_per_class else official, label)
    write_split_shards(out, TARGET, {"train": _shuffled(train, seed), "val": val, "test": test},
                       f"CIFAR-10 classes 5-9 from {folder}, {shots}/class, seed {seed}", max_samples=1000)
    return out


def method_config(base: str, method: str, target: Path, pretrained: Path, out: Path, name: str, seed: int,
                  overrides: Sequence[str] = ()) -> Config:
    weights = [] if method == "scratch" else [f"finetune.weights={pretrained}"]
    return load_config(base, [f"data.root={target}", f"run.output_dir={out}", f"run.name={name}",
                              f"train.seed={seed}", "checkpoint.resume=never", "checkpoint.save_best=false",
                              "data.num_workers=0",  # a few hundred images: read in the main process
                              *weights, *METHODS[method], *overrides])


def run_experiment(base: str, folder: Path, out: Path, seeds: Sequence[int], shots: Sequence[int],
                   pretrain_epochs: int, epochs: int, methods: Sequence[str] = tuple(METHODS),
                   source_per_class: int = 0, test_per_class: int = 0, pretrain_overrides: Sequence[str] = (),
                   overrides: Sequence[str] = ()) -> dict:
    """Everything above; returns {"shots": {n: {method: {"accuracy": [...], "mean", "std", ...}}}, ...}."""
    from pipeline.commands.train import train

    out.mkdir(parents=True, exist_ok=True)
    source = build_source(folder, out / "data" / "source_0to4", source_per_class)
    pretrained = out / "pretrain_0to4"
    done = out / "pretrain.json"  # written once pretraining finished: a rerun fine-tunes from it again
    if not done.is_file():
        started = time.perf_counter()
        metrics = train(pretrain_config(base, source, out, [f"train.epochs={pretrain_epochs}", *pretrain_overrides,
                                                            *overrides]))
        done.write_text(json.dumps({"epochs": pretrain_epochs, "seconds": round(time.perf_counter() - started, 1),
                                    "test_accuracy": float(metrics["accuracy"])}) + "\n")
    pretrain = json.loads(done.read_text())
    results: dict = {"epochs": epochs, "pretrain_epochs": pretrain["epochs"], "seeds": list(seeds),
                     "pretrain_seconds": pretrain["seconds"], "pretrain_test_accuracy": pretrain["test_accuracy"],
                     "shots": {}}
    for n in shots:
        for seed in seeds:
            target = build_target(folder, out / "data" / f"target_5to9_{n}shot_seed{seed}", n, seed, test_per_class)
            for method in methods:
                started = time.perf_counter()
                cfg = method_config(base, method, target, pretrained, out, f"{method}-{n}shot-seed{seed}", seed,
                                    [f"train.epochs={epochs}", *overrides])
                add_run(results, n, method, train(cfg), time.perf_counter() - started)
    return finish(results, out, "training images per class (CIFAR-10 classes 5-9)",
                  "Transfer from CIFAR-10 classes 0-4; official test images")



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar10-jpg.tar.gz"),
                        help="the CIFAR-10 JPEG archive, or the folder it extracts to")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pipeline",
                        help="where the archive is extracted (once)")
    add_arguments(parser, "configs/cifar10_transfer.yaml", "runs/cifar_transfer", [20, 100], 12, 40)
    args = parse_arguments(parser, list(sys.argv[1:] if argv is None else argv))
    if any(n < 1 or n > 4990 for n in args.shots):
        parser.error("--shots: every value must be between 1 and 4990")
    folder = cifar10_folder(args.data, args.cache)
    results = run_experiment(args.config, folder, args.out, args.seeds, args.shots, args.pretrain_epochs, args.epochs,
                             pretrain_overrides=PRETRAIN, overrides=args.overrides)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
