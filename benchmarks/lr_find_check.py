"""Does training at `pipeline lr-find`'s suggestion match the shipped config's lr? (docs/training.md)

    python benchmarks/lr_find_check.py configs/default.yaml --seeds 0 1 2
    python benchmarks/lr_find_check.py configs/cifar10_cpu.yaml --seeds 0 --set train.epochs=5 train.precision=fp32 \
        data.num_workers=0 --out benchmarks/results/lr_find_cifar10_cpu.json --plot docs/images/lr_find_cifar10_cpu.png

1. `pipeline lr-find CONFIG` (seed of the first --seeds), its plot copied to --plot when given.
2. For each seed: `pipeline train` at the config's own optim.lr and at the suggestion, same everything else.
3. Test accuracy of each run, mean and std per lr, written to --out (JSON) and printed.

--reuse FILE takes each run at the same lr and seed from an earlier result of the same config and --set (its
"reused_from" says so), and trains only the others: after a change of rule, only the new suggestion trains.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, environment, write_json  # noqa: E402

QUIET = ["logging.wandb_mode=disabled", "logging.progress=false"]


def _cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pipeline {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def _train(config: str, overrides: list[str]) -> dict:
    started = time.monotonic()
    line = _cli("train", config, *overrides, *QUIET, "--json").strip().splitlines()[-1]
    return {**json.loads(line)["test"], "seconds": round(time.monotonic() - started, 1)}


def _earlier_runs(path: str | None, config: str, overrides: list[str]) -> dict[tuple[float, int], dict]:
    """{(lr, seed): run} of an earlier result of the same config and overrides (empty without --reuse)."""
    if path is None:
        return {}
    earlier = json.loads(Path(path).read_text())
    if (earlier["config"], earlier["overrides"]) != (config, overrides):
        raise SystemExit(f"--reuse {path}: its config {earlier['config']} {earlier['overrides']} is not this one")
    return {(run["lr"], run["seed"]): {k: v for k, v in run.items() if k != "reused_from"}
            for rows in earlier["runs"].values() for run in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="overrides for lr-find and every training run")
    parser.add_argument("--out", default="benchmarks/results/lr_find_check.json")
    parser.add_argument("--plot", default=None, help="copy the lr-find plot here (e.g. docs/images/x.png)")
    parser.add_argument("--reuse", default=None, help="an earlier --out of the same config and --set: its runs at "
                        "the same lr and seed are taken, not trained again")
    args = parser.parse_args()
    earlier = _earlier_runs(args.reuse, args.config, args.set)
    work = Path(tempfile.mkdtemp(prefix="lr-find-check-"))
    base = [*args.set, f"run.output_dir={work}", "checkpoint.resume=never"]
    started = time.monotonic()
    found = _cli("lr-find", args.config, *base, f"train.seed={args.seeds[0]}", *QUIET)
    print(found)
    suggested = float(re.search(r"^optim\.lr=(\S+)$", found, re.M).group(1))
    sweep_seconds = round(time.monotonic() - started, 1)
    plot = Path(re.search(r"^plot: (\S+)", found, re.M).group(1))
    if args.plot:
        shutil.copyfile(plot, args.plot)
    shipped = float(re.search(r"^  lr: (\S+)$", _cli("config", "show", args.config, *args.set), re.M).group(1))
    runs: dict[str, list[dict]] = {"shipped": [], "suggested": []}
    for seed in args.seeds:
        for name, lr in (("shipped", shipped), ("suggested", suggested)):
            if (lr, seed) in earlier:
                run = earlier[(lr, seed)]
                runs[name].append({**run, "reused_from": args.reuse})
                print(f"{name} lr={lr:g} seed={seed}: accuracy {run['accuracy']:.4f} (from {args.reuse})")
                continue
            metrics = _train(args.config, [*base, f"train.seed={seed}", f"optim.lr={lr}", f"run.name={name}{seed}"])
            runs[name].append({"seed": seed, "lr": lr, **metrics})
            print(f"{name} lr={lr:g} seed={seed}: accuracy {metrics['accuracy']:.4f} ({metrics['seconds']}s)")
    summary = {name: {"lr": rows[0]["lr"], "accuracy_mean": statistics.mean(r["accuracy"] for r in rows),
                      "accuracy_std": statistics.stdev(r["accuracy"] for r in rows) if len(rows) > 1 else 0.0}
               for name, rows in runs.items()}
    record = {"config": args.config, "overrides": args.set, "seeds": args.seeds, "sweep": json.loads(
        plot.with_suffix(".json").read_text()), "sweep_seconds": sweep_seconds, "runs": runs, "summary": summary}
    write_json({**record, "environment": environment()}, args.out)
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
