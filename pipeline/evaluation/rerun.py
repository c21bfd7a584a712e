"""`pipeline evaluate RUN_DIR`: re-evaluate a finished run's best weights on a split."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.checkpointing import Checkpointer, load_weights
from pipeline.config import Config, config_from_dict
from pipeline.data import Manifest, build_loader
from pipeline.distributed import build_dist
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.metrics import ClassificationMetrics
from pipeline.models import create_model
from pipeline.training.losses import build_loss

KEYS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "confusion_matrix", "num_samples")


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run folder (no config.yaml)")
    return config_from_dict(yaml.safe_load(path.read_text()))


def evaluate_run(run_dir: str | Path, split: str = "test") -> dict:
    cfg = load_run_config(run_dir)
    dist = build_dist("fp32" if cfg.train.precision == "fp16" else cfg.train.precision, cfg.train.cpu)
    manifest = Manifest.read(cfg.data.root)
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", dist)
    folder = checkpointer.find("best") or checkpointer.find("last")
    if folder is None:
        raise FileNotFoundError(f"'{run_dir}/checkpoints' has no complete best or last checkpoint")
    model = create_model(cfg.model, manifest.num_classes, cfg.data.channels).to(dist.device)
    load_weights(model, folder / "model.safetensors")
    data = build_loader(cfg, manifest, split, dist.rank, dist.world_size, train=False)
    data.set_position(0, 0)
    metrics = evaluate(model, data.loader, build_loss(cfg.optim, manifest.num_classes).to(dist.device),
                       ClassificationMetrics(manifest.num_classes, dist.device), dist.device,
                       dist.accelerator.autocast, cfg.model.channels_last)
    return {k: metrics[k] for k in (*KEYS, "loss")}
