"""The run folder `<run.output_dir>/<run.name>/`: the name of every file a run writes there, once.

    config.yaml            the resolved config of the latest start (also inside every checkpoint folder)
    config_history.jsonl   one record per start: resumed from where, which keys changed
    run_info.json          provenance of the latest start: code version, packages, host, command line
    .run.lock              held by the running process (`pipeline.run.guards.RunLock`)
    metrics.jsonl          one record per epoch (and the end-of-run records)
    test_metrics.json      the final test metrics (`pipeline train`)
    task.json              a multilabel or regression run's task state: thresholds, target mean/std
    checkpoints/           step-NNNNNNNN/ folders, `last` (a link) and `best` (`pipeline.checkpointing`)
    PREEMPTED              the step a preempted run stopped after (removed when the run completes)
    nonfinite.json         what a non-finite stop saw (train.nonfinite)
    pretrained_load.json   which pretrained weights were loaded into which layers (finetune.weights)
    tensorboard/, wandb/, wandb_id.txt   the trackers' own files (logging.*)
    report.html            `pipeline report`
    visualize/, export/    `pipeline visualize`, `pipeline export`
    earlier/<UTC time>/    an earlier run's files, set aside by checkpoint.resume=never

On the ground floor beside `pipeline.errors` and `pipeline.exits`: it imports nothing from the package, so the
core (the trainer's marker, the checkpointer's config.yaml, the trackers' folders) names its files through it as
the run layer above it (`pipeline.run`) and the commands do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
"""The resolved config: in the run folder, and in each checkpoint folder (the config its weights were made with)."""
CHECKPOINTS_DIR = "checkpoints"
PREEMPTED_MARKER = "PREEMPTED"
"""Written by the trainer when a stop signal ended the run (holds the step); removed once a run completes."""
DIAGNOSTICS_FILE = "nonfinite.json"
"""The record of a non-finite stop (see pipeline.training.nonfinite)."""
EVENTS_DIR = "tensorboard"
"""TensorBoard's event files (logging.tensorboard)."""
LOCK_NAME = ".run.lock"
HISTORY_NAME = "config_history.jsonl"
RUN_INFO_NAME = "run_info.json"
EARLIER_NAME = "earlier"
"""checkpoint.resume=never moves an earlier run's files to <run>/earlier/<UTC time>/ instead of writing over them."""


@dataclass(frozen=True)
class RunFolder:
    """The files of one run folder, by what they are: `RunFolder(run_dir).metrics` is its metrics.jsonl."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def history(self) -> Path:
        return self.path / HISTORY_NAME

    @property
    def run_info(self) -> Path:
        return self.path / RUN_INFO_NAME

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def test_metrics(self) -> Path:
        return self.path / "test_metrics.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, name: str) -> Path:
        """A checkpoint folder by name: `best`, `last` (a link to the newest step) or step-NNNNNNNN."""
        return self.checkpoints / name

    @property
    def task(self) -> Path:
        """The task's type and state (thresholds, target mean/std), for evaluate/predict/export (pipeline.tasks)."""
        return self.path / "task.json"

    @property
    def preempted(self) -> Path:
        return self.path / PREEMPTED_MARKER

    @property
    def nonfinite(self) -> Path:
        return self.path / DIAGNOSTICS_FILE

    @property
    def pretrained_load(self) -> Path:
        return self.path / "pretrained_load.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / EVENTS_DIR

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    @property
    def wandb_id(self) -> Path:
        return self.path / "wandb_id.txt"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def visualize(self) -> Path:
        return self.path / "visualize"

    @property
    def export(self) -> Path:
        return self.path / "export"

    @property
    def earlier(self) -> Path:
        return self.path / EARLIER_NAME

    def is_run(self) -> bool:
        """Whether the folder looks like a run of ours: a config.yaml or a checkpoints/ folder in it."""
        return self.config.is_file() or self.checkpoints.is_dir()


CV_SUMMARY_FILE = "cv_summary.json"


def fold_name(fold: int) -> str:
    """The run name of fold `fold` of a cross-validation (`pipeline cv`): its run folder is <cv root>/fold<k>/."""
    return f"fold{fold}"


def fold_folder(cv_root: Path, fold: int) -> RunFolder:
    """The run folder of fold `fold` of a cross-validation under `cv_root` (`pipeline cv`)."""
    return RunFolder(Path(cv_root) / fold_name(fold))


__all__ = ["CHECKPOINTS_DIR", "CONFIG_FILE", "CV_SUMMARY_FILE", "DIAGNOSTICS_FILE", "PREEMPTED_MARKER", "RunFolder",
           "fold_folder", "fold_name"]
