"""The training loop. Distributed details stay behind `Dist` and the Accelerator, so this reads like
single-device code: `fit` calls `train_epoch`, `validate`, `end_epoch`; a step is `train_step`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.checkpointing import EMA_WEIGHTS, Checkpointer, load_weights
from pipeline.checkpointing.checkpointer import resume_folder
from pipeline.config.schema import Config
from pipeline.data import SplitLoader
from pipeline.data.stream import MAX_HISTORY, Layout
from pipeline.distributed import Dist
from pipeline.evaluation.evaluate import evaluate
from pipeline.evaluation.metrics import ClassificationMetrics
from pipeline.exits import EXIT_INTERRUPTED, EXIT_PREEMPTED, CheckpointWriteError, Interrupted, Preempted, StopRequest
from pipeline.run_folder import DIAGNOSTICS_FILE, PREEMPTED_MARKER
from pipeline.testing import faults as injected
from pipeline.tracking.console import NullProgress, progress_bar, terminal_width
from pipeline.tracking.metrics_log import MetricsLog
from pipeline.training.bad_data import BadDataMonitor
from pipeline.training.callbacks import Callback, CallbackList
from pipeline.training.early_stopping import EarlyStopping
from pipeline.training.ema import ModelEma, NoEma
from pipeline.training.mixing import BatchAugment
from pipeline.training.nonfinite import NonFiniteGuard, Verdict, reset_scaler
from pipeline.training.optim import build_l1_penalty
from pipeline.training.schedulers import LRSchedule
from pipeline.training.seed import rng_state, set_rng_state


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint's state.json."""

    epoch: int = 0
    """Epochs completed."""
    global_step: int = 0
    """Optimizer steps taken (including updates skipped for non-finite values: a step of the data stream)."""
    step_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed by this rank."""
    stopped_early: bool = False
    """Early stopping ended training."""


def resume_point(state: TrainState) -> str:
    """Where a resume goes on, in the epoch numbers the epoch lines print (1-based; `state.epoch` counts the epochs
    completed): 'in epoch 5 after 3 of its batches (step 63)' or 'after epoch 4 (step 60)'."""
    if state.step_in_epoch:
        return (f"in epoch {state.epoch + 1} after {state.step_in_epoch} of its batches "
                f"(step {state.global_step})")
    return f"after epoch {state.epoch} (step {state.global_step})"


def epoch_line(record: dict, epochs: int, seconds: float, improved: bool, width: Optional[int] = None,
               headline: tuple[str, str] = ("val/accuracy", "val_acc")) -> str:
    """The line printed after each epoch: <= 100 characters while epochs < 1000, losses < 10 (cross-entropy starts at
    ln(classes)), throughput < 1M images/s and an epoch < 10,000 s. Given a terminal's `width`, it stays one row of
    it: the throughput, then the learning rate, are left out when it would wrap (both are in metrics.jsonl).
    `headline`: the task's (record key, label) shown after the validation loss (`pipeline.tasks`)."""
    speed = record.get("images_per_second")
    key, label = headline
    fields = {"epoch": f"epoch {record['epoch']}/{epochs}", "loss": f"loss {record['train/loss']:.4f}",
              "val_loss": f"val_loss {record['val/loss']:.4f}", "val_acc": f"{label} {record[key]:.4f}",
              "lr": f"lr {record['lr']:.1e}", "speed": f"{speed:.0f} img/s" if speed else "",
              "time": f"{seconds:.1f}s", "best": "best" if improved else ""}
    line = "  ".join(v for v in fields.values() if v)
    for droppable in ("speed", "lr"):
        if width is None or len(line) <= width:
            break
        fields[droppable] = ""
        line = "  ".join(v for v in fields.values() if v)
    return line


class Trainer:
    """Owns the model, optimizer and loaders of one run and trains them."""

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
        self.stop = StopRequest(cfg.checkpoint.signals)
        self.epoch_totals = torch.zeros(3, device=dist.device)  # loss sum, training score sum, samples of this epoch
        self.bad_data = BadDataMonitor(cfg.data, dist)  # skipped/converted samples per epoch, max_bad_fraction
        self.last_save_time = time.monotonic()
        self.announce_first_step = False  # after a resume, say when training really continues
        self.epoch_history: tuple[Layout, ...] = ()  # earlier layouts of the current epoch (elastic resume)

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainState:
        """Train (resuming if asked) until the epoch budget or early stopping; end on the best weights."""
        self.maybe_resume()
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
                self.stop_if_requested()  # a signal during validation: the epoch's checkpoint is written
        self.stop.uninstall()
        self.restore_best()
        return self.state

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's share of the training shards; returns rank-averaged loss and training score
        (classification: accuracy; see `pipeline.tasks`)."""
        self.callbacks.on_epoch_start(self, epoch)
        self.model.train()
        self.train_data.set_position(epoch, self.state.step_in_epoch, self.epoch_history)
        self.steps_per_epoch = self.train_data.stream.steps_per_epoch()  # a continued epoch: its remainder's
        task = self.progress.add_task(f"epoch {epoch + 1}", total=self.steps_per_epoch,
                                      completed=self.state.step_in_epoch,
                                      images_per_step=self.cfg.train.batch_size * self.dist.world_size)
        accum = self.cfg.train.grad_accum_steps
        for images, labels in self.train_data.loader:
            micro = self.state.step_in_epoch
            window_start = micro - micro % accum
            window = min(accum, self.steps_per_epoch - window_start)
            last_in_window = micro - window_start == window - 1
            loss, score = self.train_step(images, labels, window, last_in_window)
            # Sums stay on the device and nothing is copied from the host (torch.full is a fill kernel,
            # torch.tensor would be a synchronising copy): no host sync per step. Non-finite losses are left out
            # (the guard counts them).
            count = float(labels.shape[0])
            row = torch.stack([loss.detach() * count, score, score.new_full((), count)])
            self.epoch_totals += torch.where(torch.isfinite(loss.detach()), row, 0.0)
            self.state.step_in_epoch += 1
            if last_in_window:
                self.state.global_step += 1
                self.ema.update(self.state.global_step)
                if self.state.global_step % self.cfg.train.log_every_steps == 0:  # the only host sync of a step
                    self.progress.update(task, info=f"loss {loss.item():.4f}")
                    self.bad_data.check_running(self.train_data, epoch + 1, self.state.step_in_epoch,
                                                self.steps_per_epoch)
                self.after_optimizer_step()
            self.progress.advance(task)
            self.progress.advance(self.epochs_task, 1 / self.steps_per_epoch)  # the epochs bar moves (and has an ETA)
        self.progress.remove_task(task)
        totals = self.dist.reduce_sum(self.epoch_totals.clone())
        self.epoch_totals.zero_()
        return {"loss": float(totals[0] / totals[2]), self.task.train_metric: float(totals[1] / totals[2])}

    def after_optimizer_step(self) -> None:
        """Periodic checkpoints and agreed stop requests, at optimizer-step boundaries only."""
        if self.announce_first_step:
            self.announce_first_step = False
            self.dist.print(f"first new optimizer step after resume: {self.state.global_step}")
        ckpt, step = self.cfg.checkpoint, self.state.global_step
        due = ckpt.every_steps > 0 and step % ckpt.every_steps == 0
        stop = False
        if step % ckpt.check_every_steps == 0:
            timed = ckpt.every_minutes > 0 and time.monotonic() - self.last_save_time >= ckpt.every_minutes * 60
            stop, timed = self.agree_stop(timed)
            due = due or timed
        if due or stop:
            self.save(self.checkpointer.step_name(step), final=stop)
        injected.after_step(step, due or stop, self.dist.rank)
        if stop:
            self.preempt()

    def agree_stop(self, timed: bool = False) -> tuple[bool, bool]:
        """(stop now, time-based save due), the same on every rank: one all-reduce of the host flags. A rank
        that got no signal learns the other's request, and with it the exit code (75 or 130)."""
        stop = self.stop
        preempt, interrupt, timed = self.dist.agree([stop.requested and not stop.interrupted, stop.interrupted,
                                                     timed])
        if preempt or interrupt:
            stop.request(stop.signal_name or "another rank's signal",
                         stop.exit_code if stop.requested else (EXIT_PREEMPTED if preempt else EXIT_INTERRUPTED))
        return preempt or interrupt, timed

    def stop_if_requested(self) -> None:
        """After an epoch (logged and checkpointed by `end_epoch`): stop if a signal came meanwhile."""
        if self.agree_stop()[0]:
            if not self.cfg.checkpoint.save_last:
                self.save(self.checkpointer.step_name(self.state.global_step), final=True)
            self.preempt()

    def preempt(self) -> None:
        """Leave after a stop request: the checkpoint is written; mark the run and raise.

        The signal handlers stay installed until the process ends: a repeated signal changes nothing (a
        second SIGINT exits at once, with the same code)."""
        if self.dist.is_main:
            (self.checkpointer.directory.parent / PREEMPTED_MARKER).write_text(f"{self.state.global_step}\n")
        kind = Interrupted if self.stop.interrupted else Preempted
        what = "interrupted" if self.stop.interrupted else "stop requested"
        self.dist.print(f"{what} ({self.stop.signal_name}): checkpoint saved at step {self.state.global_step}; "
                        f"resume with the same command (checkpoint.resume=auto)")
        self.stop.uninstall()
        raise kind(self.state.global_step)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, window: int,
                   last_in_window: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward of one micro-batch; an optimizer step at the end of each accumulation window."""
        accelerator = self.dist.accelerator
        images = images.to(self.dist.device, non_blocking=True)
        labels = labels.to(self.dist.device, non_blocking=True)
        # Seeded by the batch's place in the run, so a resumed run erases and mixes the same way.
        position = (self.state.epoch, len(self.epoch_history), self.state.step_in_epoch, self.dist.rank)
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
            else:
                self.skip_update(verdict)
        return loss, self.task.train_score(logits, targets)

    def skip_update(self, verdict: Verdict) -> None:
        """Act on the non-finite guard's verdict: drop the update (the step still counts), or stop with
        NonFiniteStop after writing the diagnostic record (every rank's losses and sample keys)."""
        step, epoch = self.state.global_step + 1, self.state.epoch + 1
        if verdict.stop:
            path, last = self.checkpointer.directory.parent / DIAGNOSTICS_FILE, self.checkpointer.latest()
            stream = self.train_data.stream
            self.nonfinite.write_record(verdict, step, epoch, path,
                                        lambda micro: stream.batch_sample_keys(self.state.epoch, micro),
                                        [g["lr"] for g in self.optimizer.param_groups], last)
            raise self.nonfinite.stop_error(verdict, step, epoch, path, last)
        reset_scaler(self.dist.accelerator.scaler)
        if verdict.warning:
            self.dist.warn(verdict.warning)
        self.optimizer.zero_grad(set_to_none=True)

    def validate(self) -> dict:
        self.ema.sync(self.dist)
        return evaluate(self.eval_model, self.batches(self.val_data), self.loss_fn, self.metrics, self.dist.device,
                        self.dist.accelerator.autocast, self.cfg.model.channels_last)

    def end_epoch(self, train_metrics: dict, val_metrics: dict, seconds: float) -> None:
        """Log the epoch, step epoch-level schedules, track the best, checkpoint."""
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.epoch_history = ()
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
        if improved and self.cfg.checkpoint.save_best:
            self.save("best", final)
        if self.cfg.checkpoint.save_last:
            self.save(self.checkpointer.step_name(self.state.global_step), final)
            injected.after_step(self.state.global_step, True, self.dist.rank)
        if self.state.stopped_early:
            self.dist.print(f"early stopping: no improvement of {self.cfg.train.monitor} for "
                            f"{self.early.bad_epochs} epochs (best {self.early.best:.4f} "
                            f"at epoch {self.early.best_epoch})")
        self.bad_data.check(self.state.epoch)  # after logging and saving: the epoch's counts are on record

    # ---- checkpoints ----------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.dist.accelerator.unwrap_model(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """What validation and the test run: the EMA copy when train.ema_decay > 0, else the trained weights."""
        return self.ema.module if self.ema.module is not None else self.unwrapped

    def save(self, name: str, final: bool = False) -> Optional[Path]:
        """Checkpoint (never non-finite weights). A save that cannot be written is a warning while training goes
        on (the previous checkpoint stays; the next save retries), and an error when it is the run's last one."""
        self.nonfinite.check_weights(self.unwrapped, self.state.global_step, self.checkpointer.latest)
        layout = self.train_data.stream.layout(self.state.step_in_epoch)
        state = {"train": asdict(self.state), "early_stopping": self.early.state_dict(),
                 "callbacks": self.callbacks.state_dict(), "task": self.task.state(),
                 "data_layout": {**asdict(layout), "history": [asdict(h) for h in self.epoch_history]}}
        rank_state = {"rng": rng_state(), "epoch_totals": self.epoch_totals.detach().cpu(),
                      "data_faults": self.train_data.faults.clone()}
        self.last_save_time = time.monotonic()
        self.ema.sync(self.dist)
        try:
            return self.checkpointer.save(name, self.unwrapped, self.optimizer, self.schedule,
                                          self.dist.accelerator.scaler, state, rank_state, self.ema.module)
        except CheckpointWriteError as exc:
            if final:
                raise CheckpointWriteError(f"{exc}; this was the run's last save: it resumes from "
                                           f"{self.checkpointer.latest() or 'the start'} (free space and rerun the "
                                           f"same command)") from None
            kept = self.checkpointer.find(name) if name == "best" else self.checkpointer.latest()
            self.dist.warn(f"{exc}; kept {kept or 'no earlier checkpoint'}; training goes on and the next save "
                           "retries")
            return None

    def maybe_resume(self) -> Optional[Path]:
        """Continue from the newest complete checkpoint (resume=auto) or a given folder; else start fresh."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            folder = None
        elif resume == "auto":
            folder = self.checkpointer.latest()
        else:
            folder = resume_folder(self.cfg, self.checkpointer.directory)  # verified, like auto: one line if not
        if folder is None:
            self.log.reset()
            return None
        state, rank_state = self.checkpointer.load(folder, self.unwrapped, self.optimizer, self.schedule,
                                                   self.dist.accelerator.scaler, self.ema.module)
        if self.ema.enabled and not (folder / EMA_WEIGHTS).is_file():
            self.ema.copy_source()
            self.dist.warn(f"{folder} holds no EMA weights (saved with train.ema_decay=0): the EMA starts from the "
                           "resumed weights")
        self.state = TrainState(**state["train"])
        self.early.load_state_dict(state["early_stopping"])
        self.callbacks.load_state_dict(state.get("callbacks", {}))
        if rank_state is not None and state.get("world_size") == self.dist.world_size:
            set_rng_state(rank_state["rng"])
        self.resume_epoch(folder, state, rank_state)
        self.log.truncate_after(self.state.epoch)
        if self.dist.is_main:
            (self.checkpointer.directory.parent / PREEMPTED_MARKER).unlink(missing_ok=True)
        self.dist.print(f"resumed from {folder} {resume_point(self.state)}")
        self.announce_first_step = True
        return folder

    def resume_epoch(self, folder: Path, state: dict, rank_state: Optional[dict]) -> None:
        """Where the interrupted epoch goes on (see pipeline.data.stream). In the layout it was written at
        (ranks x workers x batch size x drop_last): at its step, bit-exactly, with this rank's partial sums. In
        another: with the samples that layout left unread, split over this run's ranks (exact-once coverage;
        rank 0 takes over the old ranks' summed loss, accuracy and fault counts, so the epoch record is whole).
        Checkpoints older than the layout record resume as before: same ranks, same layout assumed."""
        saved, history = _saved_layout(state)
        stream = self.train_data.stream
        if saved.reads_like(stream.layout()) if saved else state.get("world_size") == self.dist.world_size:
            self.epoch_history = history
            if rank_state is not None:
                self._restore_sums([rank_state])
            return
        if not self.state.step_in_epoch and not history:
            return  # at an epoch boundary there is nothing to continue
        why = _cannot_continue(stream.elastic, saved, history)
        written = saved.describe() if saved else f"{state.get('world_size')} rank(s)"
        if why:
            self.dist.print(f"the checkpoint was written at {written}, this run reads with "
                            f"{stream.layout().describe()}: restarting epoch {self.state.epoch + 1} from its "
                            f"beginning ({why})")
            self.state.step_in_epoch, self.epoch_history = 0, ()
            return
        self.epoch_history, self.state.step_in_epoch = (*history, saved), 0
        stream.set_position(self.state.epoch, 0, self.epoch_history)
        if self.dist.is_main:
            self._restore_sums(self.checkpointer.rank_states(folder))
        plan = stream.plan()
        self.dist.print(f"the checkpoint was written at {written}, step {saved.step}; this run reads with "
                        f"{stream.layout().describe()}: continuing epoch {self.state.epoch + 1} with the {plan.total} "
                        f"sample(s) it left unread, {stream.steps_per_epoch()} step(s) per rank")
        self.dist.print(f"{plan.left_out()} sample(s) of the interrupted epoch are left out so every rank runs "
                        f"the same steps")

    def _restore_sums(self, rank_states: list[dict]) -> None:
        """This epoch's partial loss/accuracy sums and fault counts: the sum of the given ranks' saved ones."""
        self.epoch_totals = sum(r["epoch_totals"] for r in rank_states).to(self.dist.device)
        faults = [r.get("data_faults") for r in rank_states]  # bad samples met so far this epoch
        if all(f is not None and f.shape == self.train_data.faults.shape for f in faults):
            self.train_data.faults = sum(faults).clone()

    def restore_best(self) -> None:
        """Load the best checkpoint's weights and EMA (early stopping's 'restore best weights')."""
        best = self.checkpointer.find("best") if self.cfg.checkpoint.save_best else None
        if best is not None:
            load_weights(self.unwrapped, best / "model.safetensors")
            if self.ema.module is not None and (best / EMA_WEIGHTS).is_file():
                load_weights(self.ema.module, best / EMA_WEIGHTS)

    def batches(self, split: SplitLoader):
        """An evaluation pass over `split` from its start."""
        split.set_position(0, 0)
        return split.loader


class GuardHooks(Callback):
    """The non-finite guard's part in the callback flow: it watches the model once resumed, adds its counts to
    the epoch record (after every other callback) and keeps them in checkpoints (as the 'nonfinite' callback)."""

    name = NonFiniteGuard.name

    def __init__(self, guard: NonFiniteGuard):
        self.guard = guard

    def on_fit_start(self, trainer: Trainer) -> None:
        self.guard.watch(trainer.unwrapped)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        counts, line = self.guard.end_epoch()
        record.update(counts)
        if line:
            trainer.dist.print(f"epoch {trainer.state.epoch}: {line}")

    def state_dict(self) -> dict:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state)


def _saved_layout(state: dict) -> tuple[Optional[Layout], tuple[Layout, ...]]:
    """The data layout a checkpoint was written at (with its step) and the epoch's earlier layouts; (None, ())
    for a checkpoint older than this record."""
    record = state.get("data_layout")
    if not record:
        return None, ()
    fields = ("world_size", "workers", "batch_size", "drop_last", "step", "mix_shards")  # mix_shards: 1 if absent
    return (Layout(**{k: record[k] for k in fields if k in record}),
            tuple(Layout(**{k: h[k] for k in fields if k in h}) for h in record.get("history", [])))


def _cannot_continue(elastic: bool, saved: Optional[Layout], history: tuple[Layout, ...]) -> str:
    """Why an epoch cut in another layout must restart; '' when it can continue."""
    if not elastic:
        return "balanced sampling draws with replacement, so what was read is no set of samples"
    if saved is None:
        return "the checkpoint does not record its data layout"
    if len(history) >= MAX_HISTORY:
        return f"the epoch already went through {MAX_HISTORY} earlier layouts"
    return ""
