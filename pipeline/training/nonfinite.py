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

Test hook: `PIPELINE_NAN_AT_STEP=5` (or `5,9` or `5-8`) multiplies the loss of optimizer step 5's
micro-batches by NaN (so its gradients are NaN too); `PIPELINE_NAN_RANK=1` limits that to rank 1;
`PIPELINE_NAN_GRADS=0` adds the NaN instead, so only the loss is NaN and the gradients stay finite.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from pipeline.config.secrets import mask
from pipeline.training.callbacks import Callback

if TYPE_CHECKING:
    from pipeline.training.trainer import Trainer

EXIT_NONFINITE = 70  # EX_SOFTWARE
DIAGNOSTICS_FILE = "nonfinite.json"
MAX_WARNINGS_PER_EPOCH = 20


class NonFiniteStop(RuntimeError):
    """Training stopped on non-finite values; the CLI prints the one-line message and exits with 70."""

    exit_code = EXIT_NONFINITE
    same_on_every_rank = True


def parse_steps(text: str) -> set[int]:
    """'5' -> {5}; '5,9' -> {5, 9}; '5-8' -> {5, 6, 7, 8}."""
    steps: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            steps.update(range(int(low), int(high) + 1))
        elif part:
            steps.add(int(part))
    return steps


def _number(value: float) -> float | str:
    """JSON has no NaN/inf: those become strings."""
    return value if math.isfinite(value) else str(value)


def batch_sample_keys(stream, epoch: int, step: int) -> list[str]:
    """`shard/key` of the samples in rank-local micro-batch `step` of `epoch`: the stream's own sample sequence
    for that slot (step s comes from slot s mod workers, batch s // workers; see pipeline.data.stream), replayed
    from the batch's first position, with bad samples replaced exactly as the loader replaced them."""
    slot = stream.rank * stream.workers + step % stream.workers
    first = step // stream.workers * stream.batch_size
    fed = (source for _, _, source in stream._slot_samples(epoch, slot, first) if source is not None)
    return [f"{Path(source.url).name}/{source.key}" for source in itertools.islice(fed, stream.batch_size)]


class NonFiniteGuard(Callback):
    """Decides, once per optimizer step, whether the update may happen; counts, warns, stops."""

    name = "nonfinite"

    def __init__(self, policy: str, max_in_a_row: int, check_grads: bool, rank: int):
        self.policy, self.max_in_a_row, self.check_grads = policy, max_in_a_row, check_grads
        self.skipped = 0
        """Updates skipped this epoch for non-finite values."""
        self.scaler_skipped = 0
        """fp16 steps the GradScaler skipped this epoch."""
        self.in_a_row = 0
        """Consecutive skipped updates (across epochs)."""
        self._params: list[tuple[str, torch.nn.Parameter]] = []
        self._buffers: list[torch.Tensor] = []
        self._saved_buffers: list[torch.Tensor] = []
        self._window_bad: Optional[torch.Tensor] = None
        self._window_losses: list[torch.Tensor] = []
        self._window_micro: list[int] = []
        self._grad_norms: Optional[torch.Tensor] = None
        self._flags: Optional[torch.Tensor] = None
        nan_rank = os.environ.get("PIPELINE_NAN_RANK")
        self._nan_steps = parse_steps(os.environ.get("PIPELINE_NAN_AT_STEP", ""))
        self._nan_grads = os.environ.get("PIPELINE_NAN_GRADS", "1") != "0"
        if nan_rank is not None and int(nan_rank) != rank:
            self._nan_steps = set()

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._params = list(trainer.unwrapped.named_parameters())
        self._buffers = list(trainer.unwrapped.buffers())
        self._saved_buffers = [b.detach().clone() for b in self._buffers]

    # ---- per micro-batch and per optimizer step (the hot path) ------------------------------------
    def observe_loss(self, trainer: "Trainer", loss: torch.Tensor) -> torch.Tensor:
        """Fold this micro-batch's loss into the window's flag (no sync); applies the NaN test hook."""
        if self.policy == "ignore":
            return loss
        if self._nan_steps and trainer.state.global_step + 1 in self._nan_steps:
            loss = loss * float("nan") if self._nan_grads else loss + float("nan")
        bad = ~torch.isfinite(loss.detach())
        self._window_bad = bad if self._window_bad is None else self._window_bad | bad
        self._window_losses.append(loss.detach())
        self._window_micro.append(trainer.state.step_in_epoch)
        return loss

    def measure(self, trainer: "Trainer") -> None:
        """Before clipping: [non-finite loss, non-finite gradients] summed over ranks (all on the device)."""
        if self.policy == "ignore":
            return
        device = trainer.dist.device
        loss_bad = self._window_bad.float() if self._window_bad is not None else torch.zeros((), device=device)
        grad_bad = torch.zeros((), device=device)
        self._grad_norms = None
        if self.check_grads:
            grads = [p.grad.detach() for _, p in self._params if p.grad is not None]
            if grads:
                self._grad_norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
                grad_bad = (~torch.isfinite(self._grad_norms.sum())).float()
        flags = torch.stack([loss_bad, grad_bad])
        if trainer.dist.world_size > 1:
            flags = trainer.dist.accelerator.reduce(flags, reduction="sum")
        self._flags = flags

    def update_allowed(self, trainer: "Trainer") -> bool:
        """True: take the optimizer step. False: skip it (counted, warned). Raises NonFiniteStop. One host sync
        (none with train.nonfinite=ignore)."""
        if self.policy == "ignore":
            return True
        loss_ranks, grad_bad = self._flags.tolist()
        window_losses, window_micro = self._window_losses, self._window_micro
        self._window_bad, self._window_losses, self._window_micro = None, [], []
        if loss_ranks == 0 and grad_bad == 0:
            self.in_a_row = 0
            if self._buffers:
                torch._foreach_copy_(self._saved_buffers, self._buffers)
            return True
        self.in_a_row += 1
        self.skipped += 1
        what = " and ".join(w for w, bad in (("loss", loss_ranks), ("gradients", grad_bad)) if bad)
        step, epoch = trainer.state.global_step + 1, trainer.state.epoch + 1
        if self.policy == "halt" or self.in_a_row >= self.max_in_a_row:
            path = self._write_diagnostics(trainer, step, window_losses, window_micro, what)
            last = trainer.checkpointer.latest()
            cause = ("train.nonfinite=halt" if self.policy == "halt" else
                     f"{self.in_a_row} steps in a row, train.max_nonfinite_steps={self.max_in_a_row}")
            raise NonFiniteStop(
                f"non-finite {what} at step {step} (epoch {epoch}; {cause}): stopped without updating the weights; "
                f"details in {path}; last good checkpoint: {last or 'none'} (lower optim.lr, set "
                f"train.max_grad_norm, or check the data, then rerun the same command to resume)")
        self._reset_scaler(trainer)
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._saved_buffers)  # undo the skipped forward passes' BN updates
        if self.skipped <= MAX_WARNINGS_PER_EPOCH and trainer.dist.is_main:
            from pipeline.tracking.console import warn

            more = " (further skips this epoch are only counted)" if self.skipped == MAX_WARNINGS_PER_EPOCH else ""
            warn(f"non-finite {what} at step {step} (epoch {epoch}): update skipped ({self.in_a_row} in a row; "
                 f"the run stops at {self.max_in_a_row}){more}")
        return False

    def stepped(self, trainer: "Trainer") -> bool:
        """After optimizer.step(): False (and counted) if the fp16 GradScaler skipped it."""
        if trainer.dist.accelerator.optimizer_step_was_skipped:
            self.scaler_skipped += 1
            return False
        return True

    @staticmethod
    def _reset_scaler(trainer: "Trainer") -> None:
        """fp16: a skipped update never reaches scaler.step/update; close the scaler's iteration (same scale)."""
        scaler = trainer.dist.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            scaler.update(new_scale=scaler.get_scale())

    # ---- saves and epochs ---------------------------------------------------------------------------
    def check_weights(self, trainer: "Trainer") -> None:
        """Refuse to checkpoint non-finite weights or buffers (the last good checkpoint stays the newest)."""
        tensors = [t.detach() for t in trainer.unwrapped.state_dict().values() if t.is_floating_point()]
        if tensors and not bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors)]).sum())):
            last = trainer.checkpointer.latest()
            raise NonFiniteStop(f"the weights became non-finite by step {trainer.state.global_step}: no checkpoint "
                                f"written; last good checkpoint: {last or 'none'} (lower optim.lr or set "
                                f"train.max_grad_norm, then rerun the same command to resume)")

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None:
        record["nonfinite/skipped_steps"] = self.skipped
        record["nonfinite/scaler_skipped_steps"] = self.scaler_skipped
        if (self.skipped or self.scaler_skipped) and trainer.dist.is_main:
            trainer.dist.print(f"epoch {trainer.state.epoch}: {self.skipped} update(s) skipped for non-finite "
                               f"loss/gradients, {self.scaler_skipped} by the fp16 GradScaler")
        self.skipped = self.scaler_skipped = 0  # a checkpoint at the epoch's end starts the next epoch at zero

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "scaler_skipped": self.scaler_skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.scaler_skipped = int(state.get("scaler_skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))

    # ---- the diagnostic record (collective; only when stopping) -------------------------------------
    def _write_diagnostics(self, trainer: "Trainer", step: int, losses: list[torch.Tensor], micro: list[int],
                           what: str) -> Path:
        dist, state = trainer.dist, trainer.state
        try:
            keys = [batch_sample_keys(trainer.train_data.stream, state.epoch, m) for m in micro]
        except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the real problem
            keys = [f"unavailable: {type(exc).__name__}: {exc}"]
        mine = {"rank": dist.rank, "losses": [_number(float(v)) for v in losses],
                "batches": [{"step_in_epoch": m, "sample_keys": k} for m, k in zip(micro, keys)]}
        ranks = dist.gather_object(mine)
        path = trainer.checkpointer.directory.parent / DIAGNOSTICS_FILE
        if dist.is_main:
            names = [n for n, p in self._params if p.grad is not None]
            norms = self._grad_norms.tolist() if self._grad_norms is not None else []
            record = {
                "step": step, "epoch": state.epoch + 1, "policy": self.policy, "nonfinite": what,
                "in_a_row": self.in_a_row, "lr": [g["lr"] for g in trainer.optimizer.param_groups],
                "grad_norm": _number(math.sqrt(sum(n * n for n in norms))) if norms else None,
                "nonfinite_grads": [n for n, v in zip(names, norms) if not math.isfinite(v)],
                "ranks": ranks,
                "last_good_checkpoint": str(trainer.checkpointer.latest() or ""),
            }
            path.write_text(json.dumps(mask(record), indent=2) + "\n")  # shard URLs, errors
        return path
