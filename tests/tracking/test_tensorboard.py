"""logging.tensorboard=true: event files under the run folder; the do-nothing tracker otherwise."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest

from pipeline.commands.train import train
from pipeline.config import load_config
from pipeline.tracking.tensorboard import TensorBoardTracker, Trackers, build_tensorboard
from pipeline.tracking.wandb_logger import NullTracker
from tests.conftest import ROOT, TINY


def test_off_or_not_main_is_the_null_tracker(tmp_path: Path) -> None:
    assert isinstance(build_tensorboard(tmp_path, enabled=False, is_main=True), NullTracker)
    assert isinstance(build_tensorboard(tmp_path, enabled=True, is_main=False), NullTracker)
    assert not (tmp_path / "tensorboard").exists()
    assert isinstance(Trackers([NullTracker(), NullTracker()]).trackers[0], NullTracker)


def test_without_the_package_one_warning_and_training_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard" or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert isinstance(build_tensorboard(tmp_path, enabled=True, is_main=True), NullTracker)
    assert "logging.tensorboard=true needs the tensorboard package" in capsys.readouterr().err


def test_training_writes_event_files_under_the_run_folder(digits_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="logging.tensorboard needs the [tensorboard] extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"data.root={digits_root}", f"run.output_dir={tmp_path}", "run.name=r", "data.num_workers=0",
        "train.epochs=1", "logging.tensorboard=true", *TINY])
    metrics = train(cfg)
    events = list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in scalars.Scalars("train/loss")] == [40]  # one per epoch, at its last optimizer step
    assert [e.step for e in scalars.Scalars("val/accuracy")] == [40]
    assert scalars.Scalars("test/accuracy")[0].value == pytest.approx(metrics["accuracy"])


def test_a_failing_writer_turns_itself_off(tmp_path: Path, capsys) -> None:
    pytest.importorskip("tensorboard", reason="logging.tensorboard needs the [tensorboard] extra")
    tracker = TensorBoardTracker(tmp_path)
    tracker.writer.add_scalar = None  # type: ignore[union-attr]
    tracker.log({"loss": 1.0}, step=1)
    assert tracker.writer is None and "TensorBoard log failed" in capsys.readouterr().err
    tracker.log({"loss": 1.0}, step=2)  # nothing more
    tracker.finish()
