"""The run folder's guards: one run per folder (a lock), resume only with the config and the data that made the
weights, never write over an earlier run's history unasked, and a record of every start (config_history.jsonl,
run_info.json).

The lock is a file created atomically (O_CREAT|O_EXCL, which NFS v3+ and Lustre honour) holding the holder's
host, PID, start time and a heartbeat a daemon thread refreshes; flock alone is not enough on shared file
systems. A lock whose PID is dead on this host, or whose heartbeat is older than `STALE_AFTER_S`, is taken
over with a warning.
"""

from __future__ import annotations

import datetime
import hashlib
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

from pipeline.checkpointing.checkpointer import DATA_IN_CHECKPOINT, STEP_PREFIX, resume_folder, verify
from pipeline.config.secrets import mask_text
from pipeline.run_folder import CONFIG_FILE, EARLIER_NAME, HISTORY_NAME, LOCK_NAME, RunFolder
from pipeline.tracking.console import warn

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
"""A lock whose heartbeat is older than this (10 minutes) is stale, wherever its holder runs."""

HARMLESS_PREFIXES = ("logging.", "report.", "checkpoint.", "run.", "cv.", "dist.", "eval.")
HARMLESS_KEYS = {"data.num_workers", "data.worker_start", "data.pin_memory", "data.max_bad_fraction",
                 "data.auto_prepare_digits", "train.log_every_steps", "train.eval_batch_size",
                 "train.cudnn_benchmark", "train.early_stopping_patience", "train.early_stopping_min_delta",
                 "train.nonfinite", "train.max_nonfinite_steps", "train.cpu_threads"}
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
        self.path = RunFolder(run_dir).lock
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
        """Stop the heartbeat and remove the lock. Never raises: it runs while a run ends, and the line saying how
        the run ended (e.g. which checkpoint to resume from) must stay the last word. A lock that cannot be removed
        (a read-only folder) is a warning; its process is gone, so the next run takes it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            try:
                if (self._holder() or {}).get("pid") == self.info["pid"]:
                    self.path.unlink(missing_ok=True)
            except OSError as exc:
                warn(f"cannot remove the run folder lock '{self.path}' ({exc.strerror or exc}); the next run takes "
                     f"it over (its process is gone)")


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


def stored_config(folder: Path, run_dir: Path) -> Optional[dict]:
    """The config a checkpoint was trained with (older checkpoints: the run folder's config.yaml)."""
    for path in (folder / CONFIG_FILE, RunFolder(run_dir).config):
        if path.is_file():
            return yaml.safe_load(path.read_text())
    return None


# ---- an earlier run's history ------------------------------------------------------------------------------
def _logged_epochs(path: Path) -> list[int]:
    """The epochs metrics.jsonl records (lines that do not parse are not counted here; MetricsLog judges them)."""
    if not path.is_file():
        return []
    epochs = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            epochs.append(record["epoch"])
    return epochs


def _checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The checkpoint folders (step-*, best), newest step first; not the `last` link nor hidden temporary ones."""
    if not checkpoints.is_dir():
        return []
    folders = (p for p in checkpoints.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    return sorted(folders, key=lambda p: (p.name.startswith(STEP_PREFIX), p.name), reverse=True)


def earlier_history(run_dir: Path) -> list[str]:
    """What an earlier run left in the folder that a fresh start would write over: its epoch records and its
    checkpoints (e.g. ['metrics.jsonl epochs 1-2', 'checkpoints/step-00000080', 'checkpoints/best']); [] if none."""
    run = RunFolder(run_dir)
    epochs = _logged_epochs(run.metrics)
    found = [f"{run.metrics.name} epochs {min(epochs)}-{max(epochs)}"] if epochs else []
    return found + [f"{run.checkpoints.name}/{p.name}" for p in _checkpoint_folders(run.checkpoints)]


def unusable_history(run_dir: Path, history: list[str]) -> str:
    """The one line refusing a resume=auto start into a folder whose earlier run left no checkpoint to continue."""
    folders = _checkpoint_folders(RunFolder(run_dir).checkpoints)
    problems = {p: verify(p) for p in folders}
    damaged = [f"{p.name}: {why}" for p, why in problems.items() if why]
    intact = [p for p, why in problems.items() if not why]
    what = "; ".join(damaged[:3]) + (f"; and {len(damaged) - 3} more" if len(damaged) > 3 else "") \
        if damaged else "it completed no checkpoint"
    resume = f"checkpoint.resume={intact[0]}" if intact else "checkpoint.resume=<path of an intact checkpoint> " \
                                                            "(none here is intact)"
    return (f"run folder '{run_dir}' holds an earlier run ({', '.join(history)}) but no checkpoint to resume: {what}; "
            f"continue with {resume}, or start afresh with another run.name or with checkpoint.resume=never "
            f"(which moves the earlier run's files to {RunFolder(run_dir).earlier}/)")


def set_aside(run_dir: Path) -> Optional[Path]:
    """Move every file of an earlier run (all but config_history.jsonl, earlier/ and hidden files such as the lock)
    to <run>/earlier/<UTC time>/, with a printed line; None when there was nothing to move."""
    entries = sorted(p for p in run_dir.iterdir()
                     if p.name not in (HISTORY_NAME, EARLIER_NAME) and not p.name.startswith("."))
    if not entries:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest, n = RunFolder(run_dir).earlier / stamp, 1
    while dest.exists():
        n += 1
        dest = RunFolder(run_dir).earlier / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for entry in entries:
        entry.rename(dest / entry.name)
    print(f"checkpoint.resume=never: moved the earlier run's files ({', '.join(p.name for p in entries)}) to "
          f"{dest}/; this run starts from scratch", flush=True)
    return dest


# ---- the data a checkpoint was trained on --------------------------------------------------------------------
def data_identity(manifest) -> dict:
    """What identifies a run's data beyond data.root as a path: the class list, and a fingerprint of every split's
    shards (name, sample count, bytes, sha256 where known) and class counts: rebuilt shards at the same path differ."""
    splits = {name: {"num_samples": split.num_samples, "class_counts": dict(sorted(split.class_counts.items())),
                     "shards": [[s.name, s.num_samples, s.num_bytes, s.sha256] for s in split.shards]}
              for name, split in sorted(manifest.splits.items())}
    text = json.dumps({"classes": list(manifest.classes), "splits": splits}, sort_keys=True)
    return {"classes": list(manifest.classes), "fingerprint": hashlib.sha256(text.encode()).hexdigest(),
            "samples": {name: split["num_samples"] for name, split in splits.items()}}


def _names(classes: list) -> str:
    shown = ", ".join(map(str, classes[:6])) + (", ..." if len(classes) > 6 else "")
    return f"{len(classes)} [{shown}]"


def data_change(folder: Path, identity: Optional[dict]) -> tuple[str, bool]:
    """(what changed in the data since `folder` was written, whether allow may override it); ('', True) when the
    data is the same or the checkpoint predates the record. Another number of classes can never be resumed (the
    weights have one output per old class); renamed or reordered classes and other shards only with allow."""
    path = folder / DATA_IN_CHECKPOINT
    if identity is None or not path.is_file():
        return "", True
    old = json.loads(path.read_text())
    if old.get("classes") != identity["classes"]:
        return f"the data's classes changed: {_names(old.get('classes') or [])} -> {_names(identity['classes'])}", \
            len(old.get("classes") or []) == len(identity["classes"])
    if old.get("fingerprint") != identity["fingerprint"]:
        counts = ", ".join(f"{k} {old.get('samples', {}).get(k)} -> {v}" for k, v in identity["samples"].items()
                           if old.get("samples", {}).get(k) != v)
        return (f"the data's shards changed (fingerprint {str(old.get('fingerprint'))[:12]} -> "
                f"{identity['fingerprint'][:12]}{'; samples ' + counts if counts else ''})"), True
    return "", True


# ---- the checks of a start ----------------------------------------------------------------------------------
def check_resume(cfg, config_yaml: str, run_dir: Path, world_size: int, identity: Optional[dict] = None) -> dict:
    """Decide how this start treats the run folder, before anything in it is written: the history record, or
    ValueError (refused). A resume's config and data (`identity`, see data_identity) must be those of its checkpoint;
    resume=auto into a folder with history but no usable checkpoint is refused; resume=never sets history aside."""
    record = {"time": _now(), "resumed_from": None, "changes": [], "allowed": [], "forced": []}
    folder = resume_folder(cfg, RunFolder(run_dir).checkpoints)
    history = earlier_history(run_dir) if folder is None else []
    if history and cfg.checkpoint.resume == "auto":
        raise ValueError(unusable_history(run_dir, history))
    if history:  # resume=never
        return {**record, "set_aside": True}
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
    data, allowable = data_change(folder, identity)
    if data and not allowable:
        raise ValueError(f"cannot resume {folder}: {data}, and its weights have one output per old class; start a "
                         f"new run (another run.name), or give the data it was trained on")
    if data and cfg.checkpoint.resume_changes != "allow":
        raise ValueError(f"cannot resume {folder}: {data}; start a new run (another run.name), give the data it was "
                         f"trained on, or set checkpoint.resume_changes=allow to resume anyway (recorded in "
                         f"{HISTORY_NAME})")
    if harmless:
        print(f"resuming with changed settings: {_describe(harmless)}", flush=True)
    if refused or data:
        forced = "; ".join(text for text in (_describe(refused), data) if text)
        warn(f"resuming despite changes (checkpoint.resume_changes=allow): {forced}")
    as_list = [[k, old_v, new_v] for k, old_v, new_v in changes]
    return {**record, "resumed_from": str(folder), "changes": as_list, "allowed": [c[0] for c in harmless],
            "forced": [c[0] for c in refused] + (["data"] if data else [])}


def record_start(run_dir: Path, config_yaml: str, history: dict, world_size: int, evaluates: str = "") -> None:
    """Set an earlier run's files aside (resume=never), write config.yaml, append the start to
    config_history.jsonl, write run_info.json: only after every check passed."""
    if history.get("set_aside"):
        moved = set_aside(run_dir)
        history = {**history, "set_aside": str(moved) if moved else None}
    run = RunFolder(run_dir)
    run.config.write_text(config_yaml)
    with open(run.history, "a") as handle:
        handle.write(json.dumps(history, default=str) + "\n")
    run.run_info.write_text(json.dumps(run_info(world_size, evaluates), indent=2) + "\n")


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


__all__ = ["RunLock", "check_resume", "data_identity", "record_start"]
