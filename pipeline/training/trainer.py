"""The training loop. Distributed details stay behind `Dist` and the Accelerator, so this reads like
single-device code: `fit` calls `train_epoch`, `validate`, `end_epoch`; a step is `train_step`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from typing import Optional

import torch
from torch import nn

from pipeline.checkpointing import Checkpointer
from pipeline.checkpointing.manager import CheckpointManager
from pipeline.config.schema import Config
from pipeline.data import SplitLoader
from pipeline.distributed import Dist
from pipeline.distributed.stop import AgreedStop
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.metrics import ClassificationMetrics
from pipeline.tracking.console import NullProgress, epoch_line, progress_bar, terminal_width
from pipeline.tracking.metrics_log import MetricsLog
from pipeline.training.accumulation import AccumulationWindows
from pipeline.training.bad_data import BadDataMonitor
from pipeline.training.callbacks import Callback, CallbackList
from pipeline.training.early_stopping import EarlyStopping
from pipeline.training.ema import ModelEma, NoEma
from pipeline.training.mixing import BatchAugment
from pipeline.training.nonfinite import GuardHooks, NonFiniteGuard
from pipeline.training.optim import build_l1_penalty
from pipeline.training.schedulers import LRSchedule
from pipeline.training.state import EpochSums, TrainState, resume_point


class Trainer:
    """Owns the model, optimizer and loaders of one run and trains them. When to checkpoint and how to resume is
    the `CheckpointManager`'s; whether to stop for a signal is the `AgreedStop`'s (the same on every rank)."""

    def __init__(self, cfg: Config, dist: Dist, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: LRSchedule, loss_fn: nn.Module, train: SplitLoader, val: SplitLoader,
                 metrics: ClassificationMetrics, checkpointer: Checkpointer, log: MetricsLog, tracker,
                 callbacks: Optional[list[Callback]] = None, ema: ModelEma | NoEma | None = None, *, task):
        self.cfg, self.dist = cfg, dist
        self.task = task  # pipeline.tasks.Task: training score, epoch headline, state kept in checkpoints
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loss_fn, self.train_data, self.val_data = loss_fn, train, val
        self.metrics, self.checkpointer, self.log, self.tracker = metrics, checkpointer, log, tracker
        self.state = TrainState()
        self.ema = ema or NoEma()  # when on, what validation, the best checkpoint and the test evaluate
        self.early = EarlyStopping(cfg.train.monitor_mode, cfg.train.early_stopping_patience,
                                   cfg.train.early_stopping_min_delta)
        self.steps_per_epoch = train.stream.steps_per_epoch()
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.batch_augment = BatchAugment(cfg.data.augment, cfg.train.seed)  # random erasing, MixUp/CutMix
        self.penalty = build_l1_penalty(cfg.optim, self.unwrapped)  # optim.l1 (train/loss stays the data loss)
        self.progress = NullProgress()
        self.epochs_task = 0
        self.nonfinite = NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_steps,
                                        check_grads=cfg.train.precision != "fp16", dist=dist)
        self.callbacks = CallbackList([*(callbacks or []), GuardHooks(self.nonfinite)])
        self.stop = AgreedStop(dist, cfg.checkpoint.signals)
        self.epoch_sums = EpochSums(dist.device)  # loss, training score and samples of this epoch so far
        self.bad_data = BadDataMonitor(cfg.data, dist)  # skipped/converted samples per epoch, max_bad_fraction
        self.layouts_before = 0  # layouts that read part of the current epoch before this one (elastic resume)
        self.checkpoints = CheckpointManager(cfg, checkpointer, dist, self.stop, loop=self, model=self.unwrapped,
                                             optimizer=optimizer, schedule=schedule, ema=self.ema, loader=train,
                                             sums=self.epoch_sums.tensor, guard=self.nonfinite, log=log)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train (resuming if asked) until the epoch budget or early stopping; end on the best weights."""
        folder = self.checkpoints.resume()  # when checkpoint.resume asks
        if folder is not None:
            self.dist.print(f"resumed from {folder} {resume_point(self.state)}")
        self.callbacks.on_fit_start(self)
        self.stop.install()
        show = self.cfg.logging.progress and self.dist.is_main
        with progress_bar(show) as self.progress:
            self.epochs_task = self.progress.add_task("epochs", total=self.cfg.train.epochs,
                                                      completed=self.state.epoch)
            while self.state.epoch < self.cfg.train.epochs and not self.state.stopped_early:
                started = time.perf_counter()
                train_metrics = self.train_epoch(self.state.epoch)
                val_metrics = self.validate()
                self.end_epoch(train_metrics, val_metrics, time.perf_counter() - started)
                self.progress.update(self.epochs_task, completed=self.state.epoch)  # exact after the steps' fractions
                self.checkpoints.after_epoch()  # a signal during validation: the epoch's checkpoint is written
        self.stop.uninstall()
        self.checkpoints.restore_best()
        return self.state

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's share of the training shards; returns rank-averaged loss and training score
        (classification: accuracy; see `pipeline.tasks`)."""
        self.callbacks.on_epoch_start(self, epoch)
        self.model.train()
        self.layouts_before = self.train_data.start_epoch(epoch)  # where a resume left it, or the start
        self.steps_per_epoch = self.train_data.stream.steps_per_epoch()  # a continued epoch: its remainder's
        windows = AccumulationWindows(self.steps_per_epoch, self.cfg.train.grad_accum_steps)
        task = self.progress.add_task(f"epoch {epoch + 1}", total=self.steps_per_epoch,
                                      completed=self.state.step_in_epoch,
                                      images_per_step=self.cfg.train.batch_size * self.dist.world_size)
        for images, labels in self.train_data.loader:
            window, last_in_window = windows.window(self.state.step_in_epoch)
            loss, score = self.train_step(images, labels, window, last_in_window)
            self.epoch_sums.add(loss, score, labels.shape[0])
            self.state.step_in_epoch = self.train_data.step  # the loader counts the batches it handed out
            if last_in_window:
                self.state.global_step += 1
                self.ema.update(self.state.global_step)
                if self.state.global_step % self.cfg.train.log_every_steps == 0:  # the only host sync of a step
                    self.progress.update(task, info=f"loss {loss.item():.4f}")
                    self.bad_data.check_running(self.train_data, epoch + 1, self.state.step_in_epoch,
                                                self.steps_per_epoch)
                self.checkpoints.after_step()  # periodic checkpoints, agreed stop requests
            self.progress.advance(task)
            self.progress.advance(self.epochs_task, 1 / self.steps_per_epoch)  # the epochs bar moves (and has an ETA)
        self.progress.remove_task(task)
        return self.epoch_sums.means(self.dist, self.task.train_metric)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, window: int,
                   last_in_window: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward of one micro-batch; an optimizer step at the end of each accumulation window."""
        accelerator = self.dist.accelerator
        images = images.to(self.dist.device, non_blocking=True)
        labels = labels.to(self.dist.device, non_blocking=True)
        # Seeded by the batch's place in the run, so a resumed run erases and mixes the same way.
        position = (self.state.epoch, self.layouts_before, self.state.step_in_epoch, self.dist.rank)
        images, targets = self.batch_augment(images, labels, position)
        images = images.contiguous(memory_format=self.memory_format)
        # Gradients are all-reduced only on the last micro-batch of a window.
        sync = accelerator.no_sync(self.model) if not last_in_window else contextlib.nullcontext()
        with sync:
            with accelerator.autocast():
                logits = self.model(images)
                loss = self.loss_fn(logits.float(), targets.targets(logits.shape[-1]))
            loss = self.nonfinite.observe_loss(loss, self.state.global_step + 1, self.state.step_in_epoch)
            penalised = self.penalty(loss)
            self.dist.backward(penalised / window if window > 1 else penalised)
        if last_in_window:
            self.nonfinite.measure()  # before clipping, which would turn a non-finite norm into NaN everywhere
            if self.cfg.train.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
            self.callbacks.on_before_optimizer_step(self)
            verdict = self.nonfinite.decide(self.state.global_step + 1, self.state.epoch + 1)  # one host sync
            if verdict.take:
                self.dist.optimizer_step(self.optimizer)
                if self.nonfinite.stepped(accelerator.optimizer_step_was_skipped):  # not by the fp16 GradScaler
                    self.schedule.after_optimizer_step()
            else:  # the update is dropped (the step still counts), or the run stops with its diagnostic record
                stream, epoch = self.train_data.stream, self.state.epoch
                self.nonfinite.skip(verdict, self.state.global_step + 1, epoch + 1, self.checkpointer,
                                    lambda micro: stream.batch_sample_keys(epoch, micro), self.optimizer)
        return loss, self.task.train_score(logits, targets)

    def validate(self) -> dict:
        self.ema.sync(self.dist)
        return evaluate(self.eval_model, self.val_data.from_start(), self.loss_fn, self.metrics, self.dist.device,
                        self.dist.accelerator.autocast, self.cfg.model.channels_last)

    def end_epoch(self, train_metrics: dict, val_metrics: dict, seconds: float) -> None:
        """Log the epoch, step epoch-level schedules, track the best, checkpoint."""
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        record = {"epoch": self.state.epoch, "step": self.state.global_step, "lr": self.optimizer.param_groups[0]["lr"],
                  **{f"train/{k}": v for k, v in train_metrics.items()},
                  **{f"val/{k}": v for k, v in val_metrics.items() if not isinstance(v, (list, dict))},
                  "epoch_seconds": round(seconds, 3),
                  **self.bad_data.epoch_record(self.train_data, self.val_data, self.state.epoch)}
        self.callbacks.on_epoch_end(self, record)
        monitor = record[self.cfg.train.monitor]
        self.schedule.after_epoch(monitor)
        improved = self.early.update(monitor, self.state.epoch)
        self.state.stopped_early = self.early.should_stop
        self.log.append(record)  # the log, the tracker and print are the main process's only
        self.tracker.log(record, step=self.state.global_step)
        self.dist.print(epoch_line(record, self.cfg.train.epochs, seconds, improved, terminal_width(),
                                   self.task.headline))
        final = self.state.epoch >= self.cfg.train.epochs or self.state.stopped_early
        self.checkpoints.end_epoch(improved, final)
        if self.state.stopped_early:
            self.dist.print(self.early.stop_line(self.cfg.train.monitor))
        self.bad_data.check(self.state.epoch)  # after logging and saving: the epoch's counts are on record

    # ---- state ----------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.dist.accelerator.unwrap_model(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """What validation and the test run: the EMA copy when train.ema_decay > 0, else the trained weights."""
        return self.ema.module if self.ema.module is not None else self.unwrapped

    def state_dict(self) -> dict:
        """What a checkpoint's state.json keeps of the loop (the checkpoint manager adds the data layout)."""
        return {"train": asdict(self.state), "early_stopping": self.early.state_dict(),
                "callbacks": self.callbacks.state_dict(), "task": self.task.state()}

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainState(**state["train"])
        self.early.load_state_dict(state["early_stopping"])
        self.callbacks.load_state_dict(state.get("callbacks", {}))
