"""Weights & Biases, or a do-nothing stand-in, behind one small interface."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pipeline.tracking.console import warn


class NullTracker:
    """Used when W&B is disabled and on non-main ranks: every call does nothing."""

    run_id: str | None = None

    def log(self, values: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def log_images(self, images: dict[str, bytes]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    """A W&B run whose id is kept in the run folder, so a resumed run continues the same W&B run."""

    def __init__(self, run_dir: Path, mode: str, project: str, entity: str | None, name: str, config: dict):
        import wandb

        id_file = run_dir / "wandb_id.txt"
        # W&B run ids are lowercase alphanumerics; wandb.util.generate_id is gone from recent releases.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, entity=entity, name=name, id=run_id, resume="allow", mode=mode,
                              dir=str(run_dir), config=config, settings=wandb.Settings(console="off"))
        self.run_id = run_id

    def log(self, values: dict, step: int) -> None:
        self.run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.run.summary[key] = value

    def log_images(self, images: dict[str, bytes]) -> None:
        """PNG images (e.g. the report's figures) as wandb.Image, at the run's current step."""
        import io

        import wandb
        from PIL import Image

        self.run.log({k: wandb.Image(Image.open(io.BytesIO(v))) for k, v in images.items()})

    def finish(self) -> None:
        self.run.finish()


def build_tracker(run_dir: Path, mode: str, project: str, entity: str | None, name: str, config: dict,
                  is_main: bool) -> NullTracker | WandbTracker:
    if not is_main or mode == "disabled":
        return NullTracker()
    try:
        return WandbTracker(run_dir, mode, project, entity, name, config)
    except Exception as exc:  # noqa: BLE001 - logging must never stop training
        warn(f"W&B could not start in {mode} mode ({type(exc).__name__}: {exc}); continuing without it")
        return NullTracker()
