"""`pipeline average RUN_DIR [--last K]`: checkpoint averaging. The uniform mean of the weights of the run's newest K
epoch-end checkpoints (as fairseq's scripts/average_checkpoints.py and timm's avg_checkpoints.py do), written as the
checkpoint folder `checkpoints/averaged`; `pipeline evaluate|predict|export RUN_DIR --checkpoint averaged` use it.

Each checkpoint contributes the weights the run evaluates: its EMA copy when it has one, else the trained weights.
Floating tensors are averaged in float64 and stored in their own dtype (BatchNorm running statistics too: an
approximation of recomputing them); integer buffers (num_batches_tracked) are the newest checkpoint's. Keep enough
epoch-end checkpoints with checkpoint.keep_last >= K; mid-epoch ones (checkpoint.every_steps/every_minutes) are
skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.checkpointing import EMA_WEIGHTS, verify
from pipeline.checkpointing.checkpointer import MARKER, STEP_PREFIX
from pipeline.run_folder import CONFIG_FILE, RunFolder

AVERAGED = "averaged"
"""The folder name (under RUN_DIR/checkpoints) of the averaged weights, and the --checkpoint value that loads it."""


def epoch_end_checkpoints(run_dir: Path, last: int) -> list[Path]:
    """The newest `last` complete step checkpoints written at an epoch's end, newest first."""
    folder = RunFolder(run_dir).checkpoints
    steps = sorted((p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir()), key=lambda p: p.name, reverse=True)
    found = [p for p in steps if verify(p) is None
             and json.loads((p / "state.json").read_text())["train"]["step_in_epoch"] == 0]
    if len(found) < last:
        raise ValueError(f"'{folder}' holds {len(found)} complete epoch-end checkpoint(s); --last {last} needs {last} "
                         f"(train with checkpoint.keep_last={last} to keep them)")
    return found[:last]


def average_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """The mean of the floating tensors of safetensors `files` (the first's integer tensors kept)."""
    states = [load_file(str(f)) for f in files]
    if any(s.keys() != states[0].keys() for s in states):
        raise ValueError(f"the checkpoints {', '.join(str(f.parent.name) for f in files)} hold different tensors")
    return {key: (sum(s[key].double() for s in states) / len(states)).to(first.dtype) if first.is_floating_point()
            else first.clone() for key, first in states[0].items()}


def average_run(run_dir: str | Path, last: int = 5) -> tuple[Path, list[Path]]:
    """Write RUN_DIR/checkpoints/averaged (model.safetensors, config.yaml, averaged.json, COMPLETE); return it and
    the checkpoints averaged."""
    run_dir = Path(run_dir)
    if last < 1:
        raise ValueError(f"--last={last} must be at least 1")
    checkpoints = RunFolder(run_dir).checkpoints
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"'{run_dir}' is not a run folder with checkpoints")
    sources = epoch_end_checkpoints(run_dir, last)
    files = [s / EMA_WEIGHTS if (s / EMA_WEIGHTS).is_file() else s / "model.safetensors" for s in sources]
    weights = average_weights(files)
    final, tmp = checkpoints / AVERAGED, checkpoints / f".{AVERAGED}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"))
    shutil.copyfile(sources[0] / CONFIG_FILE, tmp / CONFIG_FILE)
    (tmp / "averaged.json").write_text(json.dumps({"averaged": [str(f.relative_to(run_dir)) for f in files]},
                                                  indent=2) + "\n")
    digests = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as handle:
            digests[path.name] = {"size": path.stat().st_size,
                                  "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
    (tmp / MARKER).write_text(json.dumps({"files": digests}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    return final, sources


__all__ = ["AVERAGED", "average_run"]
