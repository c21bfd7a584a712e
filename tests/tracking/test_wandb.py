"""W&B offline (the default): the run id is kept in the run folder, and a resumed run reuses it."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config.schema import LoggingConfig
from pipeline.tracking.wandb_logger import NullTracker, WandbTracker, build_tracker


def test_offline_run_keeps_its_id_and_config(tmp_path: Path) -> None:
    first = build_tracker(tmp_path, LoggingConfig(wandb_mode="offline", wandb_project="pipeline-tests"), "t",
                          {"train": {"epochs": 3}}, is_main=True)
    assert isinstance(first, WandbTracker)
    first.log({"train/loss": 0.5, "note": "not a number"}, step=1)
    first.finish()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert run_id == first.run_id and len(run_id) == 8 and run_id.isalnum()
    time.sleep(1.1)  # W&B names offline folders by the second; a real restart is seconds later
    second = build_tracker(tmp_path, LoggingConfig(wandb_mode="offline", wandb_project="pipeline-tests"), "t", {},
                           is_main=True)
    second.finish()
    assert second.run_id == run_id
    segments = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2  # one syncable offline directory per segment, same id
    # Offline, the resolved config travels inside the run's record file until `wandb sync`.
    assert b'"epochs"' in (segments[0] / f"run-{run_id}.wandb").read_bytes()


def test_disabled_and_non_main_ranks_get_the_null_tracker(tmp_path: Path) -> None:
    disabled, offline = LoggingConfig(wandb_mode="disabled", wandb_project="p"), LoggingConfig(wandb_project="p")
    assert isinstance(build_tracker(tmp_path, disabled, "t", {}, is_main=True), NullTracker)
    assert isinstance(build_tracker(tmp_path, offline, "t", {}, is_main=False), NullTracker)
    assert not (tmp_path / "wandb_id.txt").exists()
