"""Reports each epoch's metric to the Optuna trial and stops the run when the pruner says so."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import optuna

from pipeline.tracking.console import terminal_width
from pipeline.training.callbacks import Callback

if TYPE_CHECKING:
    from pipeline.training.trainer import Trainer


class MetricNotInRecord(ValueError):
    """tune.metric names a key the epoch record does not have."""


class TrialReporter(Callback):
    """`trial` is the Optuna trial on the process that asked for it and None on the other ranks;
    the prune decision is taken there and broadcast, so every rank stops at the same epoch."""

    name = "optuna_trial"

    def __init__(self, trial: Optional[optuna.Trial], metric: str, direction: str):
        self.trial, self.metric, self.direction = trial, metric, direction
        self.best: Optional[float] = None

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        if self.metric not in record:
            keys = ", ".join(k for k in record if "/" in k)
            raise MetricNotInRecord(f"tune.metric={self.metric!r} is not in the epoch record; choose one of {keys}")
        value = float(record[self.metric])
        better = max if self.direction == "maximize" else min
        if not math.isnan(value):
            self.best = value if self.best is None else better(self.best, value)
        prune = False
        if self.trial is not None:
            self.trial.report(value, step=record["epoch"])
            prune = self.trial.should_prune()
        if trainer.dist.broadcast_object(prune):
            from pipeline.tracking.console import epoch_line  # (loaded by then; not with `pipeline tune`'s checks)

            record["pruned"] = True
            trainer.log.append(record)  # the loop logs after callbacks; keep the pruned epoch in metrics.jsonl
            trainer.tracker.finish()
            # The loop prints the epoch line after the callbacks: print it here, or the pruned epoch shows none.
            trainer.dist.print(epoch_line(record, trainer.cfg.train.epochs, record.get("epoch_seconds", 0.0),
                                          improved=False, width=terminal_width()))
            trainer.dist.print(f"pruned at epoch {record['epoch']}: {self.metric} {value:.4f}")
            raise optuna.TrialPruned(f"pruned at epoch {record['epoch']} with {self.metric}={value}")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
