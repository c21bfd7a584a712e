"""The quick-start command on a CPU, with and without another CPU-bound job beside it: thread policies compared.

    python benchmarks/cpu_threads.py [--repeats 1] [--config configs/default.yaml] [--work DIR]

Runs `pipeline train configs/default.yaml` (the README's quick start; the digits shards are built first) as a user
types it, in turn under three thread policies: the default (`train.cpu_threads=auto`: cores - loader workers, at
least 1), `OMP_NUM_THREADS=1` (what the issue's user found fast), and `train.cpu_threads=<cores>` (torch's own
default of one thread per core, what runs got before `auto`). Each policy runs on the otherwise idle machine and
beside one competing CPU-bound process (a Python busy loop, as another user's job or a browser tab would be).
Reports the whole command's wall time and the median training images/s over its epochs; JSON to
benchmarks/results/cpu_threads.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SMOKE_ENV, SMOKE_TRAINING, environment, smoke_overrides, table, train_command, write_json  # noqa: E402

POLICIES = {
    "default (cpu_threads=auto)": ([], {}),
    "OMP_NUM_THREADS=1": ([], {"OMP_NUM_THREADS": "1"}),
    "cpu_threads=<cores> (torch's default)": ([f"train.cpu_threads={os.cpu_count()}"], {}),
}


def busy() -> subprocess.Popen:
    """Another user's CPU-bound job: one process that spins for ever (until killed)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def one(config: str, policy: str, competing: bool, work: Path, number: int) -> dict:
    overrides, env = POLICIES[policy]
    overrides = smoke_overrides(overrides, SMOKE_TRAINING)
    rival = busy() if competing else None
    try:
        result = train_command(config, overrides, work / f"run{number:02d}", env=env)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    speeds = [r["images_per_second"] for r in result["epochs"] if "images_per_second" in r]
    return {"policy": policy, "competing": competing, "exit": result["exit"], "wall_s": round(result["wall_s"], 1),
            "median_images_per_s": round(statistics.median(speeds)) if speeds else None,
            "min_images_per_s": round(min(speeds)) if speeds else None,
            "test_accuracy": (result["test"] or {}).get("accuracy")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--out", default="benchmarks/results/cpu_threads.json")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="cpu_threads_"))
    # The quick start builds the digits shards on its first run: one untimed epoch first, so no timed run does.
    train_command(args.config, smoke_overrides(["train.epochs=1"], SMOKE_TRAINING), work / "warmup")
    rows, number = [], 0
    for repeat in range(args.repeats):
        cases = [(p, c) for c in (False, True) for p in POLICIES]
        cases = cases[:2] if os.environ.get(SMOKE_ENV) == "1" else cases  # the smoke run: two 1-epoch runs
        for policy, competing in cases if repeat % 2 == 0 else list(reversed(cases)):
            row = one(args.config, policy, competing, work, number)
            number += 1
            rows.append(row)
            print(f"  {row['policy']:40s} competing={row['competing']!s:5s} exit {row['exit']}  "
                  f"{row['wall_s']:7.1f} s  median {row['median_images_per_s']} images/s", flush=True)
    written = write_json({"environment": environment(), "config": args.config, "runs": rows}, args.out)
    print(f"wrote {written}")
    headers = ["thread policy", "machine", "wall time of the command", "training images/s (median of epochs)",
               "slowest epoch images/s", "test accuracy"]
    print(table(headers, [[r["policy"], "+1 busy process" if r["competing"] else "idle", f"{r['wall_s']} s",
                           r["median_images_per_s"], r["min_images_per_s"], r["test_accuracy"]] for r in rows]))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
