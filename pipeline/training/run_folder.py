"""The run folder's guards: one run per folder (a lock), resume only with the config that made the weights,
and a record of every start (config_history.jsonl, run_info.json).

The lock is a file created atomically (O_CREAT|O_EXCL, which NFS v3+ and Lustre honour) holding the holder's
host, PID, start time and a heartbeat a daemon thread refreshes; flock alone is not enough on shared file
systems. A lock whose PID is dead on this host, or whose heartbeat is older than `STALE_AFTER_S`, is taken
over with a warning.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import yaml

from pipeline.checkpointing.checkpointer import STEP_PREFIX, verify
from pipeline.config.secrets import mask_text
from pipeline.tracking.console import warn

LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
"""A lock whose heartbeat is older than this (10 minutes) is stale, wherever its holder runs."""
HISTORY_NAME = "config_history.jsonl"
RUN_INFO_NAME = "run_info.json"
CONFIG_IN_CHECKPOINT = "config.yaml"

HARMLESS_PREFIXES = ("logging.", "report.", "checkpoint.", "run.", "cv.", "dist.", "eval.")
HARMLESS_KEYS = {"data.num_workers", "data.worker_start", "data.pin_memory", "data.max_bad_fraction",
                 "data.auto_prepare_digits", "train.log_every_steps", "train.eval_batch_size",
                 "train.cudnn_benchmark", "train.early_stopping_patience", "train.early_stopping_min_delta",
                 "train.nonfinite", "train.max_nonfinite_steps"}
"""Keys a resume may change: they touch neither the weights' shapes nor the optimisation trajectory. Every other
key (model.*, data.*, optim.*, scheduler.*, train.batch_size/precision/seed, finetune.*...) is refused unless
checkpoint.resume_changes=allow: an allow-list, so a key added later is refused until someone judges it."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<run>/.run.lock`, held by the main process for the run's life; `release` is safe to call twice."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "RunLock":
        """Take the lock (a stale one is taken over with a warning); ValueError naming the holder if held."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(self.info) + "\n")
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise ValueError(f"cannot take the run folder lock '{self.path}'; another run keeps taking it")

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written by its creator a moment ago: treat as held, judged by its age below

    def _take_over_if_stale(self) -> None:
        holder = self._holder()
        if holder is None:
            return
        age = time.time() - float(holder.get("heartbeat") or self.path.stat().st_mtime)
        here = holder.get("host") == self.info["host"]
        if here and holder.get("pid") == self.info["pid"]:  # left by an earlier run of this process (tests, tune)
            self.path.unlink(missing_ok=True)
            return
        dead = here and not _pid_alive(int(holder.get("pid", -1)))
        if not dead and age < STALE_AFTER_S:
            raise ValueError(f"run folder '{self.path.parent}' is in use by pid {holder.get('pid')} on "
                             f"{holder.get('host')} since {holder.get('since')} (lock {self.path}); wait for it, "
                             f"or choose another run.name")
        why = "its process is gone" if dead else f"no heartbeat for {age / 60:.0f} minutes"
        warn(f"taking over the stale lock '{self.path}' of pid {holder.get('pid')} on {holder.get('host')} ({why})")
        try:
            os.rename(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
            self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}").unlink()
        except FileNotFoundError:
            pass  # another process took it over first; the next O_EXCL decides

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            try:
                if (self._holder() or {}).get("pid") != self.info["pid"]:
                    return  # taken over (we looked dead): do not fight for it
                tmp.write_text(json.dumps({**self.info, "heartbeat": time.time()}) + "\n")
                tmp.replace(self.path)
            except OSError:
                pass  # a full disk must not kill the run; the next beat retries

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            if (self._holder() or {}).get("pid") == self.info["pid"]:
                self.path.unlink(missing_ok=True)


def _flat(data: object, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out: dict = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


GLOBAL_WINDOW = "world_size x train.grad_accum_steps"
"""Micro-batches per optimizer step across ranks: ranks may trade for accumulation steps, the product may not change."""


def config_changes(old: dict, new: dict, old_world: Optional[int], new_world: int) -> list[tuple[str, object, object]]:
    """(key, old, new) for every difference between two resolved configs; ranks and accumulation steps are compared
    as their product (the global batch), so 2 ranks x 1 step may resume as 1 rank x 2 steps."""
    before, after = _flat(old), _flat(new)
    keys = sorted(set(before) | set(after))
    changes = [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]
    old_accum, new_accum = before.get("train.grad_accum_steps", 1), after.get("train.grad_accum_steps", 1)
    old_window = (old_world or new_world) * old_accum
    if old_window != new_world * new_accum:
        changes.append((GLOBAL_WINDOW, old_window, new_world * new_accum))
    return [c for c in changes if c[0] != "train.grad_accum_steps" or old_window != new_world * new_accum]


def is_harmless(key: str, old: object, new: object) -> bool:
    """Whether a resume may change `key` from `old` to `new` (see HARMLESS_KEYS)."""
    if key == "train.epochs":
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES)


def _describe(changes: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def resume_folder(cfg, checkpoints: Path) -> Optional[Path]:
    """The checkpoint this start will continue from (verified), or None for a fresh start."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        return None
    if resume != "auto":
        folder = Path(resume)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint.resume='{resume}' is not a checkpoint folder")
        problem = verify(folder)
        if problem:
            raise ValueError(f"checkpoint.resume='{resume}' cannot be loaded: {problem}; give a complete checkpoint "
                             f"folder or checkpoint.resume=auto")
        return folder
    steps = sorted((p for p in checkpoints.glob(f"{STEP_PREFIX}*") if p.is_dir()), reverse=True) \
        if checkpoints.is_dir() else []
    return next((p for p in steps if verify(p) is None), None)


def stored_config(folder: Path, run_dir: Path) -> Optional[dict]:
    """The config a checkpoint was trained with (older checkpoints: the run folder's config.yaml)."""
    for path in (folder / CONFIG_IN_CHECKPOINT, run_dir / "config.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text())
    return None


def check_resume(cfg, config_yaml: str, run_dir: Path, world_size: int) -> dict:
    """Compare this start's config with the checkpoint it resumes; the history record, or ValueError (refused)."""
    record = {"time": _now(), "resumed_from": None, "changes": [], "allowed": [], "forced": []}
    folder = resume_folder(cfg, run_dir / "checkpoints")
    old = stored_config(folder, run_dir) if folder is not None else None
    if old is None:
        return record
    state_path = folder / "state.json"
    old_world = json.loads(state_path.read_text()).get("world_size") if state_path.is_file() else None
    changes = config_changes(old, yaml.safe_load(config_yaml), old_world, world_size)
    harmless = [c for c in changes if is_harmless(*c)]
    refused = [c for c in changes if not is_harmless(*c)]
    if refused and cfg.checkpoint.resume_changes != "allow":
        raise ValueError(f"cannot resume {folder}: {_describe(refused)} would change the weights or their "
                         f"trajectory; start a new run (another run.name), or set checkpoint.resume_changes=allow "
                         f"to resume anyway (recorded in {HISTORY_NAME})")
    if harmless:
        print(f"resuming with changed settings: {_describe(harmless)}", flush=True)
    if refused:
        warn(f"resuming despite changes (checkpoint.resume_changes=allow): {_describe(refused)}")
    as_list = [[k, old_v, new_v] for k, old_v, new_v in changes]
    return {**record, "resumed_from": str(folder), "changes": as_list,
            "allowed": [c[0] for c in harmless], "forced": [c[0] for c in refused]}


def _git(args: list[str]) -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_info(world_size: int, evaluates: str = "") -> dict:
    """Provenance of this start: code version, package versions, host, command line, world size, and which weights
    the run evaluates (trained or EMA, with test-time augmentation or not)."""
    commit = _git(["rev-parse", "HEAD"])
    return {"time": _now(), "host": socket.gethostname(), "pid": os.getpid(), "argv": [mask_text(a) for a in sys.argv],
            "world_size": world_size, "evaluates": evaluates, "git_commit": commit,
            "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])) if commit else None,
            "versions": {p: _version(p) for p in ("torch", "torchvision", "accelerate", "webdataset", "pipeline")}}


def record_start(run_dir: Path, config_yaml: str, history: dict, world_size: int, evaluates: str = "") -> None:
    """Write config.yaml, append the start to config_history.jsonl, write run_info.json (after the checks)."""
    (run_dir / "config.yaml").write_text(config_yaml)
    with open(run_dir / HISTORY_NAME, "a") as handle:
        handle.write(json.dumps(history, default=str) + "\n")
    (run_dir / RUN_INFO_NAME).write_text(json.dumps(run_info(world_size, evaluates), indent=2) + "\n")


__all__ = ["RunLock", "check_resume", "record_start", "resume_folder", "CONFIG_IN_CHECKPOINT"]
