"""Class-sorted shards against the same images shuffled, trained with the default recipe, over several seeds.

    python benchmarks/sorted_shards.py [--seeds 0 1 2] [--work DIR]

scikit-learn's digits written as a user's `ShardWriter` loop over an ImageFolder writes them
(`tests/support/wds_shards.py:write_class_sorted`): the 1,200 training images in class order, one class per shard
(10 shards of 109-130), and the same images shuffled into shards of the same sizes; the same shuffled val (300)
and test (297) shards. Each seed trains `pipeline train configs/default.yaml data.train=... data.val=...
data.test=... train.seed=S` on both, with the default `data.mix_shards`. Reports val accuracy after epoch 5 and
the test accuracy per seed and their means; JSON to benchmarks/results/sorted_shards.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    SMOKE_ENV,
    SMOKE_TRAINING,
    environment,
    evaluate_command,
    smoke_overrides,
    table,
    train_command,
    write_json,
)


def _listing(paths: list[str]) -> str:
    return "[" + ",".join(f"'{p}'" for p in paths) + "]"


def run(paths: dict[str, list[str]], seed: int, run_dir: Path, extra: list[str]) -> dict:
    overrides = smoke_overrides([f"data.{split}={_listing(files)}" for split, files in paths.items()]
                                + [f"train.seed={seed}", *extra], SMOKE_TRAINING)
    result = train_command("configs/default.yaml", overrides, run_dir)
    val = {r["epoch"]: r["val/accuracy"] for r in result["epochs"] if "val/accuracy" in r}
    last = max(val, default=0)
    return {"seed": seed, "exit": result["exit"], "val_after_5": val.get(min(5, last)), "val_last": val.get(last),
            "test_accuracy": (result["test"] or {}).get("accuracy"), "wall_s": round(result["wall_s"], 1),
            "test_accuracy_last_weights": last_weights_accuracy(run_dir) if result["exit"] == 0 else None}


def last_weights_accuracy(run_dir: Path) -> float:
    """Test accuracy of the last epoch's weights (`pipeline evaluate RUN --checkpoint last`): the best-validation
    weights depend on ties among 300 validation images, which picks an early epoch in some seeds."""
    return evaluate_command(run_dir, "--checkpoint", "last")["accuracy"]


def main(argv=None) -> int:
    from tests.support.wds_shards import write_class_sorted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", default="benchmarks/results/sorted_shards.json")
    args = parser.parse_args(argv)
    if os.environ.get(SMOKE_ENV) == "1":
        args.seeds = args.seeds[:1]  # the smoke run: one seed, one epoch per layout
    work = args.work or Path(tempfile.mkdtemp(prefix="sorted_shards_"))
    layouts = {"class-sorted": write_class_sorted(work / "sorted", sort=True),
               "shuffled": write_class_sorted(work / "shuffled", sort=False)}
    runs = {name: [] for name in layouts}
    for seed in args.seeds:
        for name, paths in layouts.items():
            row = run(paths, seed, work / "runs" / f"{name}-{seed}", [])
            runs[name].append(row)
            print(f"  {name:13s} seed {seed}: exit {row['exit']}  val@5 {row['val_after_5']}  "
                  f"test {row['test_accuracy']}  {row['wall_s']} s", flush=True)

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in runs[name])

    summary = {name: {key: mean(name, key) for key in ("val_after_5", "test_accuracy", "test_accuracy_last_weights")}
               for name in runs}
    written = write_json({"environment": environment(), "seeds": args.seeds, "runs": runs, "mean": summary}, args.out)
    print(f"wrote {written}")
    rows = [[name, ", ".join(f"{100 * r['val_after_5']:.2f}" for r in runs[name]), f"{100 * s['val_after_5']:.2f}%",
             ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in runs[name]), f"{100 * s['test_accuracy']:.2f}%",
             ", ".join(f"{100 * r['test_accuracy_last_weights']:.2f}" for r in runs[name]),
             f"{100 * s['test_accuracy_last_weights']:.2f}%"]
            for name, s in summary.items()]
    print(table(["training shards", "val after epoch 5 per seed", "mean", "test accuracy per seed (best val weights)",
                 "mean", "test accuracy per seed (last weights)", "mean"], rows))
    gap = 100 * (summary["shuffled"]["test_accuracy"] - summary["class-sorted"]["test_accuracy"])
    print(f"test accuracy, shuffled - class-sorted: {gap:+.2f} points (mean of {len(args.seeds)} seeds)")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["exit"] == 0 for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
