"""What each part of the modern recipe buys on CIFAR-10 at a fixed short budget: each part alone, then all of them.

    python benchmarks/recipe_ablation.py [--train-shards 10] [--epochs 8] [--seeds 0 1] [--set KEY=VALUE ...]

Every run is `pipeline train configs/cifar10_cpu.yaml` (the CPU recipe's network, optimiser and schedule) on the
first `--train-shards` training shards of data/cifar10_shards (1,000 images each; built as that config's header
says), validating on 1,000 held-out images (2 val shards), testing on the official 10,000, for `--epochs` epochs.
The baseline has every recipe part off; each other row adds one part (EMA of the weights, Mixup, CutMix,
TrivialAugment, random erasing, stochastic depth), the last all of them at once. Test-time augmentation is
measured on the baseline's own weights (`pipeline evaluate RUN --tta flip_shift`), as it costs no training. Same
epochs, same seeds for every row. JSON to benchmarks/results/recipe_ablation.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, environment, evaluate_command, smoke_overrides, table, train_command, write_json  # noqa: E402

PARTS = {
    "EMA (train.ema_decay=0.998, warm-up)": ["train.ema_decay=0.998", "train.ema_warmup=true"],
    "Mixup (alpha 0.2)": ["data.augment.mixup_alpha=0.2"],
    "CutMix (alpha 1.0)": ["data.augment.cutmix_alpha=1.0"],
    "TrivialAugment": ["data.augment.auto_augment=trivialaugment"],
    "random erasing (0.25)": ["data.augment.random_erasing=0.25"],
    "stochastic depth (0.05)": ["model.drop_path=0.05"],
}
FULL = "all of the above"
BASELINE = "baseline (every part off)"
OFF = ["train.ema_decay=0", "data.augment.mixup_alpha=0", "data.augment.cutmix_alpha=0",
       "data.augment.auto_augment=none", "data.augment.random_erasing=0", "model.drop_path=0", "eval.tta=none"]
"""Every part off, whatever the config holds: the baseline is the config's network, optimiser and schedule alone."""


def variants() -> dict[str, list[str]]:
    rows = {BASELINE: []}
    rows.update(PARTS)
    rows[FULL] = [o for overrides in PARTS.values() for o in overrides]
    return rows


def data_overrides(root: Path, train_shards: int) -> list[str]:
    last = train_shards - 1
    return [f"data.train={root}/train-{{000000..{last:06d}}}.tar", f"data.val={root}/val-{{000000..000001}}.tar",
            f"data.test={root}/test-{{000000..000009}}.tar"]


def evaluate_tta(run_dir: Path) -> float:
    return evaluate_command(run_dir, "--tta", "flip_shift")["accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data/cifar10_shards")
    parser.add_argument("--train-shards", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (e.g. train.precision=fp32 on a CPU without bf16 units)")
    parser.add_argument("--out", default="benchmarks/results/recipe_ablation.json")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="recipe_ablation_"))
    base = data_overrides(args.data, args.train_shards) + [f"train.epochs={args.epochs}", *OFF, *args.set]
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for number, (name, extra) in enumerate(variants().items()):
            overrides = smoke_overrides([*base, f"train.seed={seed}", *extra], ["train.epochs=1"])
            run_dir = work / f"v{number}-seed{seed}"
            result = train_command("configs/cifar10_cpu.yaml", overrides, run_dir)
            row = {"seed": seed, "exit": result["exit"], "wall_s": round(result["wall_s"], 1),
                   "test_accuracy": (result["test"] or {}).get("accuracy"),
                   "val_accuracy": result["epochs"][-1].get("val/accuracy") if result["epochs"] else None}
            results.setdefault(name, []).append(row)
            print(f"  {name:40s} seed {seed}: exit {row['exit']}  test {row['test_accuracy']}  {row['wall_s']} s",
                  flush=True)
            if number == 0 and row["exit"] == 0:
                tta = {"seed": seed, "exit": 0, "wall_s": 0.0, "test_accuracy": evaluate_tta(run_dir)}
                results.setdefault("test-time augmentation (flip + shift, baseline's weights)", []).append(tta)
    baseline = statistics.mean(r["test_accuracy"] for r in results[BASELINE])
    rows = []
    for name, runs in results.items():
        accuracies = [r["test_accuracy"] for r in runs]
        mean = statistics.mean(accuracies)
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        rows.append([name, f"{100 * mean:.2f} ± {100 * spread:.2f}%", f"{100 * (mean - baseline):+.2f}",
                     ", ".join(f"{100 * a:.2f}" for a in accuracies),
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f}"])
    written = write_json({"environment": environment(), "train_images": 1000 * args.train_shards, "epochs": args.epochs,
                "seeds": args.seeds, "overrides": args.set, "results": results}, args.out)
    print(f"wrote {written}")
    print(table(["part", "test accuracy (mean ± sd)", "vs baseline (points)", "per seed", "s/run"], rows))
    return 0 if all(r["exit"] == 0 for runs in results.values() for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
