"""Non-finite losses and gradients: detected on every optimizer step, agreed by every rank, skipped or halted.

How it is detected. Each micro-batch's loss is folded into a device flag (no sync). Before the
optimizer step, `measure` adds the gradients' finiteness: one fused `_foreach_norm` over the
gradients (per-parameter norms, kept for the diagnostic record), taken before clipping, because a
non-finite norm makes clipping turn every gradient into NaN. The flag is then summed over ranks in
one all-reduce of two numbers: DDP has already averaged the gradients, so a NaN gradient on one rank
is a NaN gradient everywhere, but a loss is local and must be shared explicitly.

What it costs. `update_allowed` reads that flag on the host: one sync per optimizer step. It is
the price of an exact skip: without it `optimizer.step()` would already have written NaN into the
weights and the optimizer's moments by the time anyone looked, and undoing that needs a copy of
both. GradScaler pays the same sync in fp16. `train.nonfinite=ignore` removes it.

Policy (`train.nonfinite`):
- `skip`: drop that update (gradients zeroed, learning-rate schedule not advanced, the step still
  counts as a step of the data stream), warn, count it; after `train.max_nonfinite_steps` in a row,
  stop with `NonFiniteStop` (exit code 70). The skipped batches' forward passes have already moved
  the BatchNorm running statistics (to NaN, if the input was bad), so the model's buffers are copied
  after every taken step and copied back on a skip (one on-device multi-tensor copy per step; the
  buffers are tiny next to the weights): a skipped step leaves no trace in the model.
- `halt`: stop at the first one with `NonFiniteStop`, without updating the weights.
A stop writes `<run>/nonfinite.json` (step, epoch, each rank's losses and sample keys, the gradient
norm, the parameters with non-finite gradients, the learning rates, the last good checkpoint).
Either way no checkpoint with non-finite weights is ever written (`check_weights`, before each save).

fp16: inf/NaN *gradients* are how GradScaler calibrates its scale; it skips those steps itself and
they are counted as `nonfinite/scaler_skipped_steps`, not as failures. Only the loss is checked there.

Counts per epoch go into the epoch record (metrics.jsonl, W&B): `nonfinite/skipped_steps`,
`nonfinite/scaler_skipped_steps`.

The guard is a component the loop consults: losses, the gradients and the GradScaler's verdict go in, a
`Verdict` comes out (take the update, skip it, or stop), and the trainer acts on it (zeroes the gradients, closes
the scaler's iteration, writes the diagnostic record, raises). It never sees the trainer.

Test hook: `PIPELINE_NAN_AT_STEP` and friends (see pipeline.testing.faults).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from pipeline.config.secrets import mask
from pipeline.distributed import Dist
from pipeline.exits import NonFiniteStop
from pipeline.run_folder import RunFolder
from pipeline.testing import faults
from pipeline.training.callbacks import Callback, Trainer

MAX_WARNINGS_PER_EPOCH = 20


@dataclass(frozen=True)
class Verdict:
    """The guard's decision for one optimizer step."""

    take: bool
    """Take the optimizer step (everything finite, or train.nonfinite=ignore)."""
    stop: bool = False
    """Stop the run (halt, or too many skips in a row): the trainer writes the record and raises `stop_error`."""
    what: str = ""
    """What was non-finite: 'loss', 'gradients' or 'loss and gradients'."""
    warning: str = ""
    """A line to warn with (main process only) for a skip; '' once the epoch's warnings are used up."""


TAKE = Verdict(take=True)


def _number(value: float) -> float | str:
    """JSON has no NaN/inf: those become strings."""
    return value if math.isfinite(value) else str(value)


def reset_scaler(scaler: Optional[torch.amp.GradScaler]) -> None:
    """fp16: a skipped update never reaches scaler.step/update; close the scaler's iteration (same scale)."""
    if scaler is not None and scaler.is_enabled():
        scaler.update(new_scale=scaler.get_scale())


class NonFiniteGuard:
    """Decides, once per optimizer step, whether the update may happen; counts skips and builds the stop.

    Inputs: each micro-batch's loss (`observe_loss`), the model's gradients (`measure`), the GradScaler's
    verdict (`stepped`); out: a `Verdict` (`decide`). Rank agreement goes through `Dist`."""

    name = "nonfinite"

    def __init__(self, policy: str, max_in_a_row: int, check_grads: bool, dist: Dist):
        self.policy, self.max_in_a_row, self.check_grads, self.dist = policy, max_in_a_row, check_grads, dist
        self.skipped = 0
        """Updates skipped this epoch for non-finite values."""
        self.scaler_skipped = 0
        """fp16 steps the GradScaler skipped this epoch."""
        self.in_a_row = 0
        """Consecutive skipped updates (across epochs)."""
        self._params: list[tuple[str, nn.Parameter]] = []
        self._buffers: list[torch.Tensor] = []
        self._saved_buffers: list[torch.Tensor] = []
        self._window_bad: Optional[torch.Tensor] = None
        self._window_losses: list[torch.Tensor] = []
        self._window_micro: list[int] = []
        self._grad_norms: Optional[torch.Tensor] = None
        self._flags: Optional[torch.Tensor] = None
        self._inject = faults.nan_injection(dist.rank)  # None unless a test asked for NaN losses

    def watch(self, model: nn.Module) -> None:
        """The (unwrapped) model whose gradients are checked and whose buffers a skip restores; after resume."""
        self._params = list(model.named_parameters())
        self._buffers = list(model.buffers())
        self._saved_buffers = [b.detach().clone() for b in self._buffers]

    # ---- per micro-batch and per optimizer step (the hot path) ------------------------------------
    def observe_loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """Fold the loss of micro-batch `micro` (of the epoch) of optimizer step `step` (1-based) into the
        window's flag (no sync); returns the loss (with the NaN test hook applied, if set)."""
        if self.policy == "ignore":
            return loss
        if self._inject is not None:
            loss = self._inject(step, loss)
        bad = ~torch.isfinite(loss.detach())
        self._window_bad = bad if self._window_bad is None else self._window_bad | bad
        self._window_losses.append(loss.detach())
        self._window_micro.append(micro)
        return loss

    def measure(self) -> None:
        """Before clipping: [non-finite loss, non-finite gradients] summed over ranks (all on the device)."""
        if self.policy == "ignore":
            return
        device = self.dist.device
        loss_bad = self._window_bad.float() if self._window_bad is not None else torch.zeros((), device=device)
        grad_bad = torch.zeros((), device=device)
        self._grad_norms = None
        if self.check_grads:
            grads = [p.grad.detach() for _, p in self._params if p.grad is not None]
            if grads:
                self._grad_norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
                grad_bad = (~torch.isfinite(self._grad_norms.sum())).float()
        self._flags = self.dist.reduce_sum(torch.stack([loss_bad, grad_bad]))

    def decide(self, step: int, epoch: int) -> Verdict:
        """Optimizer step `step` (1-based) of epoch `epoch` (1-based): take it, skip it (counted; the model's
        buffers are restored here) or stop. One host sync (none with train.nonfinite=ignore)."""
        if self.policy == "ignore":
            return TAKE
        loss_ranks, grad_bad = self._flags.tolist()
        self._window_bad = None
        if loss_ranks == 0 and grad_bad == 0:
            self._window_losses, self._window_micro = [], []
            self.in_a_row = 0
            if self._buffers:
                torch._foreach_copy_(self._saved_buffers, self._buffers)
            return TAKE
        self.in_a_row += 1
        self.skipped += 1
        what = " and ".join(w for w, bad in (("loss", loss_ranks), ("gradients", grad_bad)) if bad)
        if self.policy == "halt" or self.in_a_row >= self.max_in_a_row:
            return Verdict(take=False, stop=True, what=what)  # the window stays for the diagnostic record
        self._window_losses, self._window_micro = [], []
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._saved_buffers)  # undo the skipped forward passes' BN updates
        warning = ""
        if self.skipped <= MAX_WARNINGS_PER_EPOCH:
            more = " (further skips this epoch are only counted)" if self.skipped == MAX_WARNINGS_PER_EPOCH else ""
            warning = (f"non-finite {what} at step {step} (epoch {epoch}): update skipped ({self.in_a_row} in a row; "
                       f"the run stops at {self.max_in_a_row}){more}")
        return Verdict(take=False, what=what, warning=warning)

    def stepped(self, scaler_skipped: bool) -> bool:
        """After optimizer.step(): False (and counted) if the fp16 GradScaler skipped it."""
        if scaler_skipped:
            self.scaler_skipped += 1
            return False
        return True

    # ---- stopping ---------------------------------------------------------------------------------
    def skip(self, verdict: Verdict, step: int, epoch: int, checkpointer, sample_keys: Callable[[int], list[str]],
             optimizer: torch.optim.Optimizer) -> None:
        """Act on a verdict that takes no update: drop the update (the step still counts), or stop with
        NonFiniteStop after writing the diagnostic record (every rank's losses and sample keys; `sample_keys(micro)`
        names micro-batch `micro` of the epoch) beside the run's checkpoints."""
        if verdict.stop:
            path, last = RunFolder(checkpointer.directory.parent).nonfinite, checkpointer.latest()
            self.write_record(verdict, step, epoch, path, sample_keys, [g["lr"] for g in optimizer.param_groups], last)
            raise self.stop_error(verdict, step, epoch, path, last)
        reset_scaler(self.dist.accelerator.scaler)
        if verdict.warning:
            self.dist.warn(verdict.warning)
        optimizer.zero_grad(set_to_none=True)

    def stop_error(self, verdict: Verdict, step: int, epoch: int, path: Path, last: Optional[Path]) -> NonFiniteStop:
        """The error a stopping verdict raises (after `write_record` wrote `path`)."""
        cause = ("train.nonfinite=halt" if self.policy == "halt" else
                 f"{self.in_a_row} steps in a row, train.max_nonfinite_steps={self.max_in_a_row}")
        return NonFiniteStop(
            f"non-finite {verdict.what} at step {step} (epoch {epoch}; {cause}): stopped without updating the "
            f"weights; details in {path}; last good checkpoint: {last or 'none'} (lower optim.lr, set "
            f"train.max_grad_norm, or check the data, then rerun the same command to resume)")

    def write_record(self, verdict: Verdict, step: int, epoch: int, path: Path,
                     sample_keys: Callable[[int], list[str]], lrs: list[float], last: Optional[Path]) -> None:
        """The diagnostic record of a stop (collective: every rank's losses and sample keys), written by the main
        process. `sample_keys(micro)` names the samples of micro-batch `micro` of the epoch."""
        try:
            keys = [sample_keys(m) for m in self._window_micro]
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the real problem
            keys = [f"unavailable: {type(exc).__name__}: {exc}"]
        mine = {"rank": self.dist.rank, "losses": [_number(float(v)) for v in self._window_losses],
                "batches": [{"step_in_epoch": m, "sample_keys": k} for m, k in zip(self._window_micro, keys)]}
        ranks = self.dist.gather_object(mine)
        if not self.dist.is_main:
            return
        names = [n for n, p in self._params if p.grad is not None]
        norms = self._grad_norms.tolist() if self._grad_norms is not None else []
        record = {
            "step": step, "epoch": epoch, "policy": self.policy, "nonfinite": verdict.what,
            "in_a_row": self.in_a_row, "lr": lrs,
            "grad_norm": _number(math.sqrt(sum(n * n for n in norms))) if norms else None,
            "nonfinite_grads": [n for n, v in zip(names, norms) if not math.isfinite(v)],
            "ranks": ranks,
            "last_good_checkpoint": str(last or ""),
        }
        path.write_text(json.dumps(mask(record), indent=2) + "\n")  # shard URLs, errors

    # ---- saves and epochs ---------------------------------------------------------------------------
    @staticmethod
    def check_weights(model: nn.Module, step: int, latest: Callable[[], Optional[Path]]) -> None:
        """Refuse to checkpoint non-finite weights or buffers (the last good checkpoint, `latest()`, stays the
        newest)."""
        tensors = [t.detach() for t in model.state_dict().values() if t.is_floating_point()]
        if tensors and not bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)]).sum())):
            raise NonFiniteStop(f"the weights became non-finite by step {step}: no checkpoint written; last good "
                                f"checkpoint: {latest() or 'none'} (lower optim.lr or set train.max_grad_norm, then "
                                f"rerun the same command to resume)")

    def end_epoch(self) -> tuple[dict, str]:
        """The epoch record's counts and a line to print ('' for none); the counts start again at zero (a
        checkpoint at the epoch's end starts the next epoch there)."""
        record = {"nonfinite/skipped_steps": self.skipped, "nonfinite/scaler_skipped_steps": self.scaler_skipped}
        line = (f"{self.skipped} update(s) skipped for non-finite loss/gradients, {self.scaler_skipped} by the fp16 "
                "GradScaler" if self.skipped or self.scaler_skipped else "")
        self.skipped = self.scaler_skipped = 0
        return record, line

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "scaler_skipped": self.scaler_skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.scaler_skipped = int(state.get("scaler_skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


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
