"""Diagnosis of real training runs (slow: each trains for a minute or more on a loaded CPU).

- A run made to overfit (17 training images, no augmentation, dropout, weight decay or label smoothing,
  constant learning rate, 20 epochs) is diagnosed as overfitting at the right epoch: where validation
  loss turned upwards if it did, else where the train/validation accuracy gap opened for good. (With
  BatchNorm on digits, validation loss mostly plateaus rather than rises within a CPU budget.)
- The default digits run is diagnosed healthy.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from pipeline.commands.diagnose import diagnose_run, read_history
from pipeline.commands.diagnose.rules import OVERFIT_GAP
from pipeline.commands.train import train
from pipeline.config import load_config
from pipeline.data.writer.digits import write_digits_imagefolder
from pipeline.data.writer.shards import write_shards

pytestmark = pytest.mark.slow
QUIET = ["data.num_workers=0", "logging.wandb_mode=disabled", "logging.progress=false"]


def gap_opened(history: list[dict], threshold: float) -> int:
    """First epoch of the final stretch in which train accuracy exceeds validation accuracy by >= threshold."""
    epoch = history[-1]["epoch"]
    for record in reversed(history):
        if record["train/accuracy"] - record["val/accuracy"] < threshold:
            break
        epoch = record["epoch"]
    return epoch


def test_overfit_run_is_diagnosed_at_the_right_epoch(tmp_path):
    with tempfile.TemporaryDirectory() as images:
        write_digits_imagefolder(images)
        manifest = write_shards(images, tmp_path / "shards", fractions=[0.01, 0.15, 0.84], show_progress=False)
    assert manifest.splits["train"].num_samples == 17
    cfg = load_config(None, [
        f"data.root={tmp_path / 'shards'}", "data.image_size=16", "data.channels=1", "data.mean=[0.5]",
        "data.std=[0.5]", "model.dropout=0", "optim.lr=0.002", "optim.weight_decay=0", "optim.label_smoothing=0",
        "scheduler.name=constant", "train.epochs=20", "train.batch_size=2", "train.monitor=val/loss",
        "train.monitor_mode=min", f"run.output_dir={tmp_path / 'runs'}", "run.name=overfit", *QUIET])
    train(cfg)
    run_dir = tmp_path / "runs" / "overfit"
    history = read_history(run_dir)
    lowest = min(history, key=lambda r: r["val/loss"])["epoch"]
    best_state = json.loads((run_dir / "checkpoints" / "best" / "state.json").read_text())
    assert best_state["train"]["epoch"] == lowest
    findings = {f.kind: f for f in diagnose_run(run_dir)}
    assert "overfitting" in findings and "healthy" not in findings and "underfitting" not in findings
    overfit = findings["overfitting"]
    # The epoch named: where validation loss turned upwards if it did, else where the accuracy gap opened for good.
    if overfit.evidence[0].startswith("validation loss was lowest"):
        assert overfit.epoch == lowest
    else:
        assert overfit.epoch == gap_opened(history, OVERFIT_GAP)
        assert overfit.evidence[-1] == (f"training accuracy has exceeded validation accuracy by at least 10 points "
                                        f"since epoch {overfit.epoch}")
    assert overfit.summary.startswith(f"The model overfits from epoch {overfit.epoch} on")


def test_default_digits_run_is_healthy(tmp_path):
    cfg = load_config(Path("configs/default.yaml"), [f"data.root={tmp_path / 'shards'}",
                                                     f"run.output_dir={tmp_path / 'runs'}", *QUIET])
    train(cfg)
    findings = diagnose_run(tmp_path / "runs" / cfg.run.name)
    assert [f.kind for f in findings] == ["healthy"]
    assert findings[0].summary.startswith("No sign of over- or underfitting")
