"""Digits transfer experiment: pretrain on digits 0-4, fine-tune on 5-9 with few training images per class.

    python benchmarks/digits_transfer.py --seeds 0 1 2 --shots 20 5 2

1. Shards: digits 0-4 (70/15/15 split; pretraining uses all its training images) and digits 5-9
   with exactly `shots` training and 10 validation images per class (for each `--shots` value), every
   other 5-9 image in the test split.
2. Pretrain `configs/digits_transfer.yaml`'s network on 0-4 once.
3. For each seed, on 5-9: (a) scratch, (b) feature extraction (frozen pretrained backbone, new
   head), (c) gradual unfreezing with layer-wise learning-rate decay; same epochs and batch size.
4. Print and write `<out>/transfer_results.json`, a markdown table of test accuracy mean ± std and
   `<out>/transfer_results.png` (accuracy against images per class, one line per method).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.transfer import FROM_SCRATCH, add_arguments, add_run, finish, parse_arguments, pretrain_config, table  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.data.writer.subsets import write_split_shards  # noqa: E402

METHODS = {
    "scratch": FROM_SCRATCH,
    # A linear probe on frozen features needs a much larger step than training everything from scratch.
    "feature_extraction": ["finetune.freeze=feature_extraction", "finetune.layer_decay=1.0", "optim.lr=0.1"],
    # Head at 0.01; each group nearer the input gets half the lr of the next; one more group every 2 epochs.
    "gradual_unfreezing": ["finetune.freeze=gradual", "finetune.unfreeze_every=2", "finetune.layer_decay=0.5",
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
    from pipeline.data.writer.stratify import stratified_split

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


def method_config(base: str, method: str, target: Path, pretrained: Path, out: Path, seed: int,
                  overrides: Sequence[str] = ()) -> Config:
    weights = [] if method == "scratch" else [f"finetune.weights={pretrained}"]
    return load_config(base, [f"data.root={target}", f"run.output_dir={out}", f"run.name={method}-seed{seed}",
                              f"train.seed={seed}", "checkpoint.resume=never", *weights, *METHODS[method],
                              *overrides])


def run_experiment(base: str, out: Path, seeds: Sequence[int], shots: Sequence[int] = (20,), pretrain_epochs: int = 6,
                   epochs: int = 30, methods: Sequence[str] = tuple(METHODS), overrides: Sequence[str] = ()) -> dict:
    """Everything above; returns {"shots": {n: {method: {"accuracy": [...], "mean", "std", ...}}}, ...}."""
    from pipeline.commands.train import train

    out.mkdir(parents=True, exist_ok=True)
    source, _ = build_transfer_shards(out / "data", shots[0])
    started = time.perf_counter()
    train(pretrain_config(base, source, out, [f"train.epochs={pretrain_epochs}", *overrides]))
    pretrained = out / "pretrain_0to4"
    results: dict = {"epochs": epochs, "pretrain_epochs": pretrain_epochs, "seeds": list(seeds),
                     "pretrain_seconds": round(time.perf_counter() - started, 1), "shots": {}}
    for n in shots:
        _, target = build_transfer_shards(out / "data", n)
        for method in methods:
            for seed in seeds:
                started = time.perf_counter()
                cfg = method_config(base, method, target, pretrained, out, seed,
                                    [f"train.epochs={epochs}", f"run.name={method}-{n}shot-seed{seed}", *overrides])
                add_run(results, n, method, train(cfg), time.perf_counter() - started)
    return finish(results, out, "training images per class (digits 5-9)", "Transfer from digits 0-4")



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "configs/digits_transfer.yaml", "runs/digits_transfer", [20], 6, 30)
    args = parse_arguments(parser, list(sys.argv[1:] if argv is None else argv))
    if any(n < 1 for n in args.shots):
        parser.error("--shots: every value must be at least 1")
    results = run_experiment(args.config, args.out, args.seeds, args.shots, args.pretrain_epochs, args.epochs,
                             overrides=args.overrides)
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
