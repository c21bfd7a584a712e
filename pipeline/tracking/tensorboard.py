"""TensorBoard event files under the run folder (logging.tensorboard=true), beside or instead of W&B.

The same small interface as `pipeline.tracking.wandb_logger` (log, summary, log_images, finish); disabled, on
non-main ranks, or without the tensorboard package it is the do-nothing `NullTracker`. `Trackers` sends each call
to every tracker, so the loop keeps one `tracker` object whatever is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.run_folder import RunFolder
from pipeline.tracking.console import warn
from pipeline.tracking.wandb_logger import NullTracker

"""Sub-folder of the run folder that holds the event files (`tensorboard --logdir runs/`)."""


class TensorBoardTracker:
    """Scalars (and the report's images) as TensorBoard events; a failing call warns once and turns it off."""

    run_id: str | None = None

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer: object | None = SummaryWriter(log_dir=str(log_dir))
        self.last_step = 0

    def _call(self, what: str, fn) -> None:
        if self.writer is None:
            return
        try:
            fn(self.writer)
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            warn(f"TensorBoard {what} failed ({type(exc).__name__}: {exc}); TensorBoard logging is off for the rest "
                 "of this run (metrics.jsonl has everything)")
            self.writer = None

    def log(self, values: dict, step: int) -> None:
        self.last_step = step
        self._call("log", lambda w: [w.add_scalar(k, v, step) for k, v in _scalars(values).items()])

    def summary(self, values: dict) -> None:
        """Final values (test metrics) at the last logged step."""
        self._call("summary", lambda w: [w.add_scalar(k, v, self.last_step) for k, v in _scalars(values).items()])

    def log_images(self, images: dict[str, bytes]) -> None:
        import io

        import numpy as np
        from PIL import Image

        def add(writer) -> None:
            for key, png in images.items():
                writer.add_image(key, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), self.last_step,
                                 dataformats="HWC")

        self._call("log_images", add)

    def finish(self) -> None:
        self._call("finish", lambda w: w.close())
        self.writer = None


def _scalars(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def build_tensorboard(run_dir: Path, enabled: bool, is_main: bool) -> TensorBoardTracker | NullTracker:
    """Event files under RUN_DIR/tensorboard when enabled on the main process; else (or without the package, one
    warning) the do-nothing tracker."""
    if not enabled or not is_main:
        return NullTracker()
    try:
        return TensorBoardTracker(RunFolder(run_dir).tensorboard)
    except ImportError:
        warn("logging.tensorboard=true needs the tensorboard package (pip install -e \".[tensorboard]\"); "
             "continuing without it (metrics.jsonl has everything)")
        return NullTracker()


class Trackers:
    """Several trackers behind the one interface; `run_id` is the first tracker's that has one (W&B's)."""

    def __init__(self, trackers: Sequence[object]):
        self.trackers = [t for t in trackers if not isinstance(t, NullTracker)] or [NullTracker()]

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if getattr(t, "run_id", None)), None)

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def summary(self, values: dict) -> None:
        for tracker in self.trackers:
            tracker.summary(values)

    def log_images(self, images: dict[str, bytes]) -> None:
        for tracker in self.trackers:
            tracker.log_images(images)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
