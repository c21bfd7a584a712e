"""Every distributed concern in one place: the Accelerator, rank checks, agreement, main-only I/O.

The rest of the code asks a `Dist` object ("is this the main process?", "does any rank want to
stop?") and never touches torch.distributed or environment variables itself.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class Dist:
    """A thin facade over an `Accelerator`."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # ---- the training step's calls into Accelerate ------------------------------------------------
    # Accelerate's wrappers add nothing without a GradScaler (fp16) or DeepSpeed/Megatron/XLA, but cost
    # ~120 us per step on a CPU: AcceleratedOptimizer.step looks up an optional package (importlib, with
    # file-system stats) twice per call, zero_grad inspects a signature, backward divides the loss by 1.
    # Then the step calls torch directly; otherwise it goes through Accelerate as before.

    @property
    def _plain(self) -> bool:
        acc = self.accelerator
        return (acc.scaler is None and acc.gradient_accumulation_steps == 1 and acc.distributed_type not in
                (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA))

    def backward(self, loss: torch.Tensor) -> None:
        if self._plain:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.step()` then `zero_grad(set_to_none=True)`."""
        inner = getattr(optimizer, "optimizer", None) if self._plain else None
        target = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        target.step()
        target.zero_grad(set_to_none=True)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on at least one rank."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def agree(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of `flags` across ranks, in one all-reduce."""
        if self.world_size == 1:
            return list(flags)
        value = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        return [bool(v > 0) for v in self.accelerator.reduce(value, reduction="sum").tolist()]

    def broadcast_object(self, obj: object) -> object:
        """`obj` from the main process, on every rank."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to create files), then the others."""
        with self.accelerator.main_process_first():
            yield

    def print(self, *args, **kwargs) -> None:
        """Print on the main process only."""
        if self.is_main:
            from pipeline.tracking.console import console

            console.print(*args, **kwargs)


def build_dist(precision: str = "fp32", cpu: bool = False) -> Dist:
    """Create the Accelerator. Without CUDA the CPU is used (gloo when several ranks are launched)."""
    use_cpu = cpu or not torch.cuda.is_available()
    if precision == "fp16" and use_cpu:
        raise ValueError("train.precision=fp16 needs a CUDA GPU (none is in use); use bf16 or fp32")
    if precision == "bf16" and not use_cpu and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32")
    return Dist(Accelerator(cpu=use_cpu, mixed_precision=MIXED_PRECISION[precision]))


__all__ = ["Dist", "build_dist"]
