"""When a training run saves, what a checkpoint holds of it, and resuming from one: the trainer only asks.

Cadence: every `checkpoint.every_steps` optimizer steps, every `checkpoint.every_minutes` (agreed across ranks with
the stop request, every `checkpoint.check_every_steps`), at each epoch's end (`save_last`; `best` on improvement)
and when the run stops for a signal (then the run folder gets the PREEMPTED marker and the loop leaves with
`Preempted`/`Interrupted`). A save that cannot be written is a warning while training goes on, an error when it is
the run's last one.

What is saved: the model, optimizer, LR schedule, GradScaler and EMA weights (`Checkpointer`); the loop's state
(`loop.state_dict()`: position, early stopping, callbacks, task); the train loader's own state (layout history and
fault counts, `SplitLoader.state_dict`); each rank's RNG states and partial epoch sums.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from pipeline.checkpointing.checkpointer import EMA_WEIGHTS, Checkpointer, load_weights, resume_folder
from pipeline.checkpointing.rng import rng_state, set_rng_state
from pipeline.config.schema import Config
from pipeline.data.loader_state import FAULTS
from pipeline.distributed import Dist
from pipeline.distributed.stop import AgreedStop
from pipeline.exits import CheckpointWriteError, Interrupted, Preempted
from pipeline.run_folder import RunFolder
from pipeline.testing import faults as injected


class CheckpointManager:
    """Saves and resumes one training loop. `loop`: the trainer, whose `state_dict`/`load_state_dict` hold what
    state.json keeps of it and whose `state` says where it stands (epoch, global_step, step_in_epoch); `loader`:
    the train SplitLoader; `sums`: the loop's partial epoch sums (a device tensor updated in place); `ema`: the
    EMA (or NoEma); `guard`: the non-finite guard (no non-finite weights are saved); `log`: metrics.jsonl."""

    def __init__(self, cfg: Config, checkpointer: Checkpointer, dist: Dist, stop: AgreedStop, *, loop, model: nn.Module,
                 optimizer: torch.optim.Optimizer, schedule, ema, loader, sums: torch.Tensor, guard, log):
        self.cfg, self.checkpointer, self.dist, self.stop = cfg, checkpointer, dist, stop
        self.loop, self.model, self.optimizer, self.schedule, self.ema = loop, model, optimizer, schedule, ema
        self.loader, self.sums, self.guard, self.log = loader, sums, guard, log
        self.last_save_time = time.monotonic()
        self.announce_first_step = False  # after a resume, say when training really continues

    # ---- cadence --------------------------------------------------------------------------------
    def after_step(self) -> None:
        """Periodic checkpoints and agreed stop requests, at optimizer-step boundaries only."""
        step = self.loop.state.global_step
        if self.announce_first_step:
            self.announce_first_step = False
            self.dist.print(f"first new optimizer step after resume: {step}")
        ckpt = self.cfg.checkpoint
        due = ckpt.every_steps > 0 and step % ckpt.every_steps == 0
        stop = False
        if step % ckpt.check_every_steps == 0:
            timed = ckpt.every_minutes > 0 and time.monotonic() - self.last_save_time >= ckpt.every_minutes * 60
            stop, timed = self.stop.agree(timed)
            due = due or timed
        if due or stop:
            self.save(self.checkpointer.step_name(step), final=stop)
        injected.after_step(step, due or stop, self.dist.rank)
        if stop:
            self.leave()

    def end_epoch(self, improved: bool, final: bool) -> None:
        """The epoch's checkpoints: `best` when the monitored metric improved, the step checkpoint (save_last)."""
        step = self.loop.state.global_step
        if improved and self.cfg.checkpoint.save_best:
            self.save("best", final)
        if self.cfg.checkpoint.save_last:
            self.save(self.checkpointer.step_name(step), final)
            injected.after_step(step, True, self.dist.rank)

    def after_epoch(self) -> None:
        """After an epoch (logged and checkpointed): stop if a signal came meanwhile."""
        if self.stop.should_stop():
            if not self.cfg.checkpoint.save_last:
                self.save(self.checkpointer.step_name(self.loop.state.global_step), final=True)
            self.leave()

    def leave(self) -> None:
        """Leave after a stop request: the checkpoint is written; mark the run and raise.

        The signal handlers stay installed until the process ends: a repeated signal changes nothing (a
        second SIGINT exits at once, with the same code)."""
        step, stop = self.loop.state.global_step, self.stop
        if self.dist.is_main:
            RunFolder(self.checkpointer.directory.parent).preempted.write_text(f"{step}\n")
        kind = Interrupted if stop.interrupted else Preempted
        what = "interrupted" if stop.interrupted else "stop requested"
        self.dist.print(f"{what} ({stop.signal_name}): checkpoint saved at step {step}; "
                        f"resume with the same command (checkpoint.resume=auto)")
        stop.uninstall()
        raise kind(step)

    # ---- save -----------------------------------------------------------------------------------
    def save(self, name: str, final: bool = False) -> Optional[Path]:
        """Checkpoint (never non-finite weights). A save that cannot be written is a warning while training goes
        on (the previous checkpoint stays; the next save retries), and an error when it is the run's last one."""
        position = self.loop.state
        self.guard.check_weights(self.model, position.global_step, self.checkpointer.latest)
        data = self.loader.state_dict()  # where the loader stands: the epoch and step it reached
        state = {**self.loop.state_dict(), "data_layout": data["layout"]}
        rank_state = {"rng": rng_state(), "epoch_totals": self.sums.detach().cpu(), FAULTS: data["faults"]}
        self.last_save_time = time.monotonic()
        self.ema.sync(self.dist)
        try:
            return self.checkpointer.save(name, self.model, self.optimizer, self.schedule,
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

    # ---- resume ---------------------------------------------------------------------------------
    def resume(self) -> Optional[Path]:
        """Continue from the newest complete checkpoint (resume=auto) or a given folder; None: start fresh."""
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
        state, rank_state = self.checkpointer.load(folder, self.model, self.optimizer, self.schedule,
                                                   self.dist.accelerator.scaler, self.ema.module)
        if self.ema.enabled and not (folder / EMA_WEIGHTS).is_file():
            self.ema.copy_source()
            self.dist.warn(f"{folder} holds no EMA weights (saved with train.ema_decay=0): the EMA starts from the "
                           "resumed weights")
        self.loop.load_state_dict(state)
        if rank_state is not None and state.get("world_size") == self.dist.world_size:
            set_rng_state(rank_state["rng"])
        self.resume_epoch(folder, state, rank_state)
        self.log.truncate_after(self.loop.state.epoch)
        if self.dist.is_main:
            RunFolder(self.checkpointer.directory.parent).preempted.unlink(missing_ok=True)
        self.announce_first_step = True
        return folder

    def resume_epoch(self, folder: Path, state: dict, rank_state: Optional[dict]) -> None:
        """Where the interrupted epoch goes on: the loader decides (`pipeline.data.loader_state`); this rank's
        partial sums follow the rank states it took over."""
        position = self.loop.state

        def rank_states(every: bool) -> list[dict]:
            if every:
                return self.checkpointer.rank_states(folder) if self.dist.is_main else []
            return [] if rank_state is None else [rank_state]

        saved = {"layout": state.get("data_layout"), "world_size": state.get("world_size"),
                 "epoch": position.epoch, "step": position.step_in_epoch}  # (the loop's: for checkpoints without one)
        went_on = self.loader.load_state_dict(saved, rank_states)
        position.step_in_epoch = went_on.step
        if went_on.took_over:
            self.sums.copy_(sum(r["epoch_totals"] for r in went_on.took_over).to(self.sums.device))
        for line in went_on.lines:
            self.dist.print(line)

    def restore_best(self) -> None:
        """Load the best checkpoint's weights and EMA (early stopping's 'restore best weights')."""
        best = self.checkpointer.find("best") if self.cfg.checkpoint.save_best else None
        if best is not None:
            load_weights(self.model, best / "model.safetensors")
            if self.ema.module is not None and (best / EMA_WEIGHTS).is_file():
                load_weights(self.ema.module, best / EMA_WEIGHTS)
