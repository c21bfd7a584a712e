"""Shared helpers of the benchmark scripts: alternating timed blocks, medians, and the JSON record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]

SMOKE_ENV = "PIPELINE_BENCH_SMOKE"
SMOKE_TRAINING = ["train.epochs=1", "model.channels=[8,16]", "data.image_size=8", "logging.wandb_mode=disabled"]
"""A smoke run's training overrides (`smoke_overrides`): one epoch of a tiny model on tiny images."""
"""Set to 1 (tests/test_bench.py does, running docs/performance.md's command lines as written) to cap the sizes."""


def smoke_sizes(args, **caps: int):
    """With PIPELINE_BENCH_SMOKE=1, cap each named argument (`steps=2`, ...) so the run takes seconds; the code
    path is the one the documented command takes. Otherwise `args` unchanged."""
    if os.environ.get(SMOKE_ENV) == "1":
        for name, cap in caps.items():
            setattr(args, name, min(getattr(args, name), cap))
    return args


def smoke_overrides(overrides: list[str], tiny: list[str]) -> list[str]:
    """With PIPELINE_BENCH_SMOKE=1, config overrides for a tiny model and images first (the caller's still win)."""
    return [*tiny, *overrides] if os.environ.get(SMOKE_ENV) == "1" else overrides


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so the next Accelerator may use another precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def alternate(contenders: dict[str, Callable[[], int]], repeats: int, device: torch.device,
              log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """Run each contender once per repeat, in an order that flips every repeat; return seconds per unit.

    A contender returns how many units (steps, images) it processed, or (units, seconds) when it times
    itself (to leave out set-up that is not part of what is compared). Alternating in one process means
    a noisy neighbour slows all contenders alike, so medians of the per-repeat ratios stay meaningful.
    """
    names = list(contenders)
    per_unit: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            sync(device)
            started = time.perf_counter()
            units = contenders[name]()
            sync(device)
            seconds = time.perf_counter() - started
            if isinstance(units, tuple):
                units, seconds = units
            per_unit[name].append(seconds / units)
            log(f"  repeat {repeat + 1}/{repeats}  {name:28s} {units:6d} units  {seconds / units * 1e3:9.3f} ms/unit")
    return per_unit


def ratios(per_unit: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Median over repeats of (contender time / reference time) within the same repeat."""
    return {name: statistics.median(a / b for a, b in zip(times, per_unit[reference]))
            for name, times in per_unit.items()}


def environment() -> dict:
    """What a result must be stored with to be comparable: machine, versions, code commit."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "commit": commit + ("+dirty" if dirty else ""), "load_average": list(os.getloadavg())}


def write_json(result: dict, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (what the README shows)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def train_command(config: str, overrides: list[str], run_dir: Path, env: dict | None = None,
                  python: str | None = None) -> dict:
    """`pipeline train CONFIG OVERRIDES` in a fresh process, as a user types it, into `run_dir`.

    Returns the exit code, the command's wall seconds, its epoch records (metrics.jsonl lines that carry
    `epoch_seconds`) and test_metrics.json (None when absent). The run's own output goes to run_dir/../<name>.log."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [python or sys.executable, "-m", "pipeline", "train", config, *overrides,
               f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", "logging.progress=false"]
    log = run_dir.parent / f"{run_dir.name}.log"
    started = time.perf_counter()
    with open(log, "w") as sink:
        code = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=sink,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    test = run_dir / "test_metrics.json"
    return {"exit": code, "wall_s": wall, "log": str(log),
            "epochs": [r for r in records if "epoch_seconds" in r],
            "test": json.loads(test.read_text()) if test.is_file() else None}


def evaluate_command(run_dir: Path, *flags: str) -> dict:
    """`pipeline evaluate RUN_DIR FLAGS --json` in a fresh process, as a user types it; its metrics."""
    out = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", str(run_dir), *flags, "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])
