"""Atomic, verifiable checkpoints.

A checkpoint is a folder: `model.safetensors`, `ema.safetensors` (the EMA of the weights, when train.ema_decay > 0),
`optimizer.pt`, `scheduler.pt`, `scaler.pt` (fp16),
`rng/rank<r>.pt` for each rank (its RNG states and partial-epoch sums), `state.json` (epoch,
step, position in the epoch, best metric...), `config.yaml` (the resolved config it was trained
with) and `data.json` (the identity of the data it was trained on: classes, shard fingerprint).
Periodic and epoch-end checkpoints are `step-NNNNNNNN` folders (the newest complete one is
what `resume=auto` continues from; `last` is a symbolic link to it for people); `best` holds the
best weights by the monitored metric. It is written to a hidden temporary folder, every file is
fsynced, `COMPLETE` (a JSON list of file sizes and sha256 digests) is written last, and only then
is the folder renamed into place. A folder without a valid `COMPLETE`, or whose files no longer
match it, is never loaded. Nothing here unpickles objects: tensors load from safetensors or
`torch.load(weights_only=True)` (`safe_load.load_tensors`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.checkpointing.safe_load import load_tensors
from pipeline.distributed import Dist
from pipeline.errors import first_line
from pipeline.exits import CheckpointWriteError
from pipeline.run_folder import CONFIG_FILE
from pipeline.testing import faults

MARKER = "COMPLETE"


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    for path in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def verify(folder: Path) -> Optional[str]:
    """None if `folder` is a complete, intact checkpoint; else the reason it is not."""
    marker = folder / MARKER
    if not marker.is_file():
        return "no COMPLETE marker (the save was interrupted)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable COMPLETE marker"
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {expected['size']}"
        if _sha256(path) != expected["sha256"]:
            return f"{rel} does not match its sha256"
    return None


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path) -> None:
    save_file(model_state(model), str(path))


def load_weights(model: nn.Module, path: Path, strict: bool = True):
    """Load a safetensors state dict into `model` (on the model's device)."""
    device = next(iter(model.state_dict().values())).device
    return model.load_state_dict(load_file(str(path), device=str(device)), strict=strict)


EMA_WEIGHTS = "ema.safetensors"
"""The EMA copy's weights in a checkpoint folder; what evaluation loads when present (see pipeline.training.ema)."""
STEP_PREFIX = "step-"
DATA_IN_CHECKPOINT = "data.json"
"""The identity of the data a checkpoint was trained on (classes, shard fingerprint), beside its config.yaml."""


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


def _tensor_bytes(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuse early, with a clear message, a checkpoint that cannot fit (torch.save would fail cryptically)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint needs about {needed / 2**20:.1f} MiB, "
                                    f"{free / 2**20:.1f} MiB are free")


def _torch_save(obj: object, path: Path) -> None:
    """torch.save, whose write errors (a RuntimeError 'enforce fail ... unexpected pos') get a readable cause."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        free = shutil.disk_usage(path.parent).free
        if free < 2**16:  # what it almost always is
            raise OSError(errno.ENOSPC, f"No space left on device ({free} bytes free): torch.save could not write "
                                        f"{path.name}") from None
        raise OSError(errno.EIO, f"torch.save could not write {path.name} ({free / 2**20:.1f} MiB free on the "
                                 f"device): {first_line(exc)}") from None


class Checkpointer:
    """Saves and loads training checkpoints under one folder (`<run>/checkpoints`)."""

    def __init__(self, directory: str | Path, dist: Dist, keep_last: int = 2, config_yaml: str = "",
                 data_identity: Optional[dict] = None):
        self.directory = Path(directory)
        self.config_yaml = config_yaml  # stored in every checkpoint: what a resume compares its config with
        self.data_identity = data_identity  # ... and its data with (see pipeline.run.guards.data_identity)
        self.dist = dist
        self.keep_last = keep_last

    @staticmethod
    def step_name(global_step: int) -> str:
        return f"{STEP_PREFIX}{global_step:08d}"

    def save(self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             scaler: Optional[object], state: dict, rank_state: dict, ema: Optional[nn.Module] = None) -> Path:
        """Collective: every rank calls it (each writes its own RNG state and partial sums).

        If any rank cannot write its part (disk full, permissions...), every rank raises the same
        `CheckpointWriteError`; the temporary folder is removed and earlier checkpoints, `last` and
        `best` are left exactly as they were.
        """
        final, tmp = self.directory / name, self.directory / f".{name}.tmp"
        main = self.dist.is_main
        stages = [(main, lambda: self._begin(tmp)),
                  (True, lambda: _torch_save(rank_state, tmp / "rng" / f"rank{self.dist.rank}.pt")),
                  (main, lambda: self._write_and_swap(name, tmp, final, model, optimizer, scheduler, scaler, state,
                                                           ema))]
        error: Optional[BaseException] = None
        for runs_here, stage in stages:
            if runs_here:
                try:
                    stage()
                except (OSError, RuntimeError, SafetensorError) as exc:
                    error = exc
            if self.dist.any(error is not None):  # also the barrier between stages
                raise self._abandon(name, tmp, final, error)
        return final

    def _begin(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)

    def _write_and_swap(self, name: str, tmp: Path, final: Path, model: nn.Module, optimizer, scheduler,
                        scaler: Optional[object], state: dict, ema: Optional[nn.Module] = None) -> None:
        weights, optimizer_state = model_state(model), optimizer.state_dict()
        ema_weights = model_state(ema) if ema is not None else {}
        _check_free_space(self.directory, _tensor_bytes(weights) + _tensor_bytes(optimizer_state)
                          + _tensor_bytes(ema_weights))
        save_file(weights, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(ema_weights, str(tmp / EMA_WEIGHTS))
        faults.before_save_commit(state.get("train", {}).get("global_step"))
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "world_size": self.dist.world_size}, indent=2))
        if self.config_yaml:
            (tmp / CONFIG_FILE).write_text(self.config_yaml)
        if self.data_identity is not None:
            (tmp / DATA_IN_CHECKPOINT).write_text(json.dumps(self.data_identity, indent=1))
        _fsync_tree(tmp)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({"files": files}, indent=1))
        _fsync_tree(tmp)
        old = self.directory / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old, ignore_errors=True)
        if name.startswith(STEP_PREFIX):
            try:
                self._point_last_at(final)
                self._prune()
            except OSError as exc:  # the checkpoint itself is complete; only the convenience link/pruning failed
                from pipeline.tracking.console import warn

                warn(f"checkpoint '{final}' is complete, but updating 'last' or pruning failed: {exc}")

    def _abandon(self, name: str, tmp: Path, final: Path, error: Optional[BaseException]) -> "CheckpointWriteError":
        """Remove the partial folder (an interrupted swap is undone); the error every rank raises."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            old = self.directory / f".{name}.old"
            if old.is_dir() and not final.exists():
                old.replace(final)
        reasons = self.dist.gather_object(None if error is None else first_line(error))
        rank, reason = next((r, m) for r, m in enumerate(reasons) if m is not None)
        where = f" (rank {rank})" if self.dist.world_size > 1 else ""
        return CheckpointWriteError(f"cannot write checkpoint '{final}'{where}: {reason}")

    def _point_last_at(self, folder: Path) -> None:
        link, tmp_link = self.directory / "last", self.directory / ".last.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(folder.name)
        tmp_link.replace(link)

    def _prune(self) -> None:
        """Delete step checkpoints beyond the newest `keep_last` complete ones, and partial folders left by
        saves that were killed."""
        complete = [p for p in self.step_folders() if verify(p) is None]
        for folder in complete[self.keep_last:]:
            shutil.rmtree(folder, ignore_errors=True)
        for partial in self.directory.glob(f".{STEP_PREFIX}*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)

    def step_folders(self) -> list[Path]:
        """step-* folders, newest first."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)),
                      key=lambda p: p.name, reverse=True)

    def latest(self) -> Optional[Path]:
        """The newest complete step checkpoint; incomplete or corrupt ones are skipped with a warning."""
        return self._first_complete(self.step_folders())

    def find(self, name: str) -> Optional[Path]:
        """The complete checkpoint `name` (or its previous version left by an interrupted swap)."""
        return self._first_complete([self.directory / name, self.directory / f".{name}.old"])

    def _first_complete(self, candidates: list[Path]) -> Optional[Path]:

        for folder in (c for c in candidates if c.is_dir()):
            problem = verify(folder)
            if problem is None:
                return folder
            self.dist.warn(f"skipping checkpoint '{folder}': {problem}")
        return None

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             scaler: Optional[object], ema: Optional[nn.Module] = None) -> tuple[dict, Optional[dict]]:
        """Restore everything; return (state, this rank's saved state or None if it was not saved). `ema` is
        loaded when the folder holds its weights (the caller copies the model into it when it does not)."""
        try:
            load_weights(model, folder / "model.safetensors")
        except RuntimeError as exc:  # e.g. other classes, with a checkpoint older than its data.json
            detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line),
                          first_line(exc)).rstrip(".")
            raise ValueError(f"cannot load '{folder / 'model.safetensors'}' into this model (was it trained on other "
                             f"data or another architecture?): {detail}; start a new run (another run.name)") from None
        if ema is not None and (folder / EMA_WEIGHTS).is_file():
            load_weights(ema, folder / EMA_WEIGHTS)
        optimizer.load_state_dict(load_tensors(folder / "optimizer.pt"))
        scheduler.load_state_dict(load_tensors(folder / "scheduler.pt", map_location=None))
        if scaler is not None and (folder / "scaler.pt").is_file():
            scaler.load_state_dict(load_tensors(folder / "scaler.pt", map_location=None))
        state = json.loads((folder / "state.json").read_text())
        rank_path = folder / "rng" / f"rank{self.dist.rank}.pt"
        rank_state = load_tensors(rank_path, map_location=None) if rank_path.is_file() else None
        return state, rank_state

    @staticmethod
    def rank_states(folder: Path) -> list[dict]:
        """The state every rank that wrote `folder` saved of its own (RNG, partial sums), in rank order."""
        paths = sorted((folder / "rng").glob("rank*.pt"), key=lambda p: int(p.stem[len("rank"):]))
        return [load_tensors(path, map_location=None) for path in paths]
