"""A finished run loaded for inspection: its config, manifest, eval transform and best weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from pipeline.checkpointing import EMA_WEIGHTS, Checkpointer, load_weights
from pipeline.config import Config, config_from_dict
from pipeline.data import Manifest, SplitLoader, build_loader
from pipeline.data.dataset.resolve import dataset_manifest
from pipeline.distributed import Dist, build_dist
from pipeline.models import create_model
from pipeline.run_folder import RunFolder
from pipeline.tasks import Task, load_task


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist")
    path = RunFolder(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run folder (no {path.name})")
    return config_from_dict(yaml.safe_load(path.read_text()))


@dataclass
class LoadedRun:
    """A run's model in eval mode on `device`, with what is needed to feed it."""

    run_dir: Path
    cfg: Config
    manifest: Manifest
    model: nn.Module
    dist: Dist
    checkpoint: Path
    weights: str = "model"
    """Which weights were loaded: model (the trained ones) or ema (their moving average, train.ema_decay > 0)."""
    task: Task | None = None
    """What the model predicts, with the state the run stored (thresholds, target mean/std; `pipeline.tasks`)."""

    @property
    def folder(self) -> RunFolder:
        """The run folder's files."""
        return RunFolder(self.run_dir)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)

    def split_loader(self, split: str) -> SplitLoader:
        """The split's loader on this rank, at its start; its `bad_samples` count the bad samples left out."""
        data = build_loader(self.cfg, self.manifest, split, self.dist.rank, self.dist.world_size, train=False)
        data.set_position(0)
        return data

    def loader(self, split: str):
        return self.split_loader(split).loader


def load_run(run_dir: str | Path, checkpoint: str | None = None) -> LoadedRun:
    """Load the run's best weights (or its last checkpoint when it kept no best), or those of the checkpoint folder
    named `checkpoint` (e.g. averaged), into a fresh model: the EMA copy when the checkpoint holds one (what the run
    validated and tested), else the trained weights."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    dist = build_dist("fp32" if cfg.train.precision == "fp16" else cfg.train.precision, cfg.train.cpu)
    manifest = dataset_manifest(cfg.data, task=cfg.task)
    checkpoints = RunFolder(run_dir).checkpoints
    checkpointer = Checkpointer(checkpoints, dist)
    if checkpoint is not None:
        folder = checkpointer.find(checkpoint)
        if folder is None:
            raise FileNotFoundError(f"'{checkpoints}' has no complete checkpoint '{checkpoint}'")
    else:
        folder = checkpointer.find("best") or checkpointer.find("last")
    if folder is None:
        raise FileNotFoundError(f"'{checkpoints}' has no complete best or last checkpoint")
    model = create_model(cfg.model, manifest.num_classes, cfg.data.channels).to(dist.device)
    weights = "ema" if (folder / EMA_WEIGHTS).is_file() else "model"
    load_weights(model, folder / (EMA_WEIGHTS if weights == "ema" else "model.safetensors"))
    model.eval()
    return LoadedRun(run_dir, cfg, manifest, model, dist, folder, weights, load_task(cfg, manifest, run_dir))
