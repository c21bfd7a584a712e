"""Time to resume: process start -> first new optimizer step, for a run killed mid-epoch.

    python benchmarks/resume_time.py [--repeats 3] [key=value ...]

Trains the default digits config with mid-epoch checkpoints, SIGKILLs it right after the checkpoint
at step 50 (mid-epoch 3), then resumes it `--repeats` times from that checkpoint (the later
checkpoints are removed each time) and reports the seconds from `Popen` to the line the trainer
prints at its first new step, next to a fresh start's set-up time (Popen -> "run folder:" line, i.e.
imports, Accelerator, data and model ready). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds_until(cmd: list[str], marker: str, env: dict) -> float:
    """Start `cmd`, return seconds until a stdout line contains `marker`; then stop the process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if marker in line:
            elapsed = time.perf_counter() - started
            proc.kill()
            proc.wait()
            return elapsed
    proc.wait()
    raise RuntimeError(f"'{marker}' never printed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/resume_time.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resume_time_"))
    base = [sys.executable, "-m", "pipeline", "train", "configs/default.yaml", f"run.output_dir={work}",
            "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.every_steps=10",
            "checkpoint.keep_last=10", *args.overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*base, "run.name=cut"], cwd=ROOT, capture_output=True,
                   env={**env, "PIPELINE_KILL_AT_STEP": "50", "PIPELINE_KILL_AFTER_SAVE": "1"})
    checkpoints = work / "cut" / "checkpoints"
    saved = checkpoints.parent.parent / "saved_checkpoints"
    shutil.copytree(checkpoints, saved, symlinks=True)
    resume, fresh = [], []
    for _ in range(args.repeats):
        shutil.rmtree(checkpoints)
        shutil.copytree(saved, checkpoints, symlinks=True)
        resume.append(_seconds_until([*base, "run.name=cut"], "first new optimizer step after resume", env))
        shutil.rmtree(work / "fresh", ignore_errors=True)
        fresh.append(_seconds_until([*base, "run.name=fresh"], "run folder:", env))
    result = {"resume_seconds": resume, "resume_median": statistics.median(resume),
              "fresh_setup_seconds": fresh, "fresh_median": statistics.median(fresh),
              "ratio_resume_to_fresh": statistics.median(resume) / statistics.median(fresh),
              "machine": f"{os.cpu_count()} CPUs", "python": sys.version.split()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
