"""Every distributed concern in one place: the Accelerator, rank checks, agreement, main-only I/O.

The rest of the code asks a `Dist` object ("is this the main process?", "does any rank want to
stop?") and never touches torch.distributed or environment variables itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from pipeline.errors import first_line
from pipeline.exits import EXIT_DISTRIBUTED, exit_now

T = TypeVar("T")
# Errors re-raised as themselves on the other ranks by `Dist.on_main` (the CLI turns them into one line).
SHAREABLE_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError, KeyError, TimeoutError)}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
"""What `accelerate launch` sets from --mixed_precision or its --config_file (accelerate.utils.launch)."""


def choose_precision(configured: str) -> tuple[str, str]:
    """(the precision to train in, a line to print or ''), from train.precision and accelerate launch's value.

    The rule: an explicit train.precision (fp32, bf16, fp16) wins, and one line says so when `accelerate launch`
    asked for another; train.precision=auto takes accelerate's value, and fp32 when not launched by accelerate."""
    launched = os.environ.get(LAUNCHER_PRECISION_ENV, "").strip().lower()
    launched_as = {value: name for name, value in MIXED_PRECISION.items()}.get(launched)
    if configured != "auto":
        if launched and launched_as != configured:
            return configured, (f"precision: train.precision={configured} wins over accelerate launch's "
                                f"mixed_precision={launched} (train.precision=auto would use accelerate's)")
        return configured, ""
    if not launched:
        return "fp32", ""
    if launched_as is None:
        raise ValueError(f"accelerate launch's mixed_precision={launched} is not supported here; set "
                         "train.precision to fp32, bf16 or fp16")
    return launched_as, f"precision: {launched_as} (train.precision=auto: accelerate launch's mixed_precision)"


class Dist:
    """A thin facade over an `Accelerator`."""

    def __init__(self, accelerator: Accelerator, timeout_s: float = 600.0):
        self.accelerator = accelerator
        self.timeout_s = timeout_s  # the longest a collective waits (dist.timeout_s), on every group
        self._host_group = None

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

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (on the device) summed over ranks, on every rank (one all-reduce; none for one process)."""
        if self.world_size == 1:
            return values
        return self.accelerator.reduce(values, reduction="sum")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on at least one rank."""
        return self.agree([flag])[0]

    def agree(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of host-side `flags` across ranks, in one all-reduce over the host group."""
        if self.world_size == 1:
            return list(flags)
        import torch.distributed as distributed

        value = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
        distributed.all_reduce(value, group=self.host_group)
        return [v > 0 for v in value.tolist()]

    @property
    def host_group(self):
        """A gloo process group over every rank, for agreeing on host-side flags (stop requests, save errors).

        Its all-reduce takes CPU tensors, so asking it never waits for the GPU: over NCCL the flags would
        have to go to the device and back, a full synchronisation of the training stream at every step that
        checks for a stop. Made by `build_dist` on every rank (creating a group is itself collective)."""
        if self._host_group is None:
            import torch.distributed as distributed

            # With the default group's timeout: new_group's own default is 30 minutes, which left a rank waiting
            # for a stopped one in `agree` for half an hour instead of dist.timeout_s.
            self._host_group = distributed.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        return self._host_group

    def gather_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D `values` as the rows of a (world_size, n) CPU tensor, on every rank (one all-gather)."""
        if self.world_size == 1:
            return values.detach().cpu().clone().unsqueeze(0)
        gathered = self.accelerator.gather(values.detach().to(self.device).unsqueeze(0))
        return gathered.reshape(self.world_size, -1).cpu()

    def broadcast_object(self, obj: object) -> object:
        """`obj` from the main process, on every rank."""
        if self.world_size == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` (on this rank's device) with rank 0's, in place, on every rank."""
        if self.world_size == 1 or not tensors:
            return
        import torch.distributed as distributed

        for tensor in tensors:
            distributed.broadcast(tensor, src=0)

    def on_main(self, fn: Callable[[], T], share: bool = True) -> T | None:
        """`fn()` on the main process only; every rank gets its result (None off the main process unless
        `share`), or raises if it failed there.

        For work only rank 0 may do (talking to a study database): if it fails, the other ranks learn
        it at once and raise too, instead of waiting at the next collective for the rank that left."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
        if self.world_size > 1:
            # The error travels as (type name, text): an exception object might not pickle.
            failure = (type(error).__name__, str(error)) if error is not None else None
            shared, failure = self.broadcast_object((result if share and error is None else None, failure))
            result = result if self.is_main else shared
            if failure is not None and error is None:
                kind = SHAREABLE_ERRORS.get(failure[0], RuntimeError)
                raise kind(failure[1] if kind is not RuntimeError else f"the main process failed: {failure[1]}")
        if error is not None:
            raise error
        return result

    def gather_object(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank (for rare paths: failures, diagnostics)."""
        if self.world_size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to create files), then the others."""
        with self.accelerator.main_process_first():
            yield

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                register_frozen: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Wrap for the launch (DDP when several ranks). DDP all-reduces only the parameters that require grad
        when it wraps the model; with `register_frozen` (gradual unfreezing) every parameter is registered, so
        one unfrozen later is all-reduced too. A frozen one gets no gradient, and DDP (built with
        find_unused_parameters, see `build_dist`) leaves its grad None, so the optimizer skips it."""
        if not (register_frozen and self.world_size > 1):
            return self.accelerator.prepare(model, optimizer)
        params = list(model.parameters())
        trainable = [p.requires_grad for p in params]
        for param in params:
            param.requires_grad_(True)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        for param, flag in zip(params, trainable):
            param.requires_grad_(flag)
        return model, optimizer

    def print(self, *args, **kwargs) -> None:
        """Print on the main process only (secrets masked)."""
        if self.is_main:
            from pipeline.config.secrets import mask_text
            from pipeline.tracking.console import console

            console.print(*(mask_text(a) if isinstance(a, str) else a for a in args), **kwargs)

    def warn(self, message: str) -> None:
        """A warning line on the main process only (secrets masked), for conditions every rank meets alike.
        (`pipeline.tracking.console.warn` says it on every rank: for what only this rank saw.)"""
        if self.is_main:
            from pipeline.tracking.console import warn

            warn(message)


def process_rank() -> int:
    """This process's rank in its launch (`RANK`, set by torchrun / accelerate launch); 0 when not launched.
    For code that runs before or without a `Dist` (the CLI's last lines, warnings)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """Rank 0 of the launch (or not launched): the process that prints a command's result."""
    return process_rank() == 0


def teardown() -> bool:
    """Leave the process group, if this process joined one (best effort, on the way out); True if it had.

    At the end of a command, or a failure every rank agreed on: a rank that exits with gloo's threads still
    running can abort ('terminate called without an active exception', SIGABRT) and hide the real exit code."""
    import torch.distributed as distributed

    if not (distributed.is_available() and distributed.is_initialized()):
        return False
    try:
        distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    return True


def build_dist(precision: str = "fp32", cpu: bool = False, find_unused_parameters: bool = False,
               timeout_s: float = 600.0, init_timeout_s: float = 120.0) -> Dist:
    """Create the Accelerator. Without CUDA the CPU is used (gloo when several ranks are launched).

    `find_unused_parameters` is for models whose trainable set changes during training (gradual
    unfreezing): DDP then tolerates parameters that get no gradient in a step. Collectives wait at most
    `timeout_s` for the other ranks; forming the process group at most `init_timeout_s` (see `init_watchdog`)."""
    use_cpu = cpu or not torch.cuda.is_available()
    if precision == "auto":
        precision = choose_precision(precision)[0]
    if precision == "fp16" and use_cpu:
        raise ValueError("train.precision=fp16 needs a CUDA GPU (none is in use); use bf16 or fp32")
    if precision == "bf16" and not use_cpu and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32")
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    with init_watchdog(init_timeout_s):
        dist = Dist(Accelerator(cpu=use_cpu, mixed_precision=MIXED_PRECISION[precision], kwargs_handlers=handlers),
                    timeout_s)
        if dist.world_size > 1:
            dist.host_group  # noqa: B018 - created now, at the same point on every rank
            dist.barrier()  # every rank has joined: the group is formed
    return dist


@contextlib.contextmanager
def init_watchdog(seconds: float) -> Iterator[None]:
    """End the process with one line and `EXIT_DISTRIBUTED` if the block (forming the process group) takes
    longer than `seconds`: a rank that never started, or a rendezvous port still held by an earlier run, would
    otherwise keep the others waiting silently (torch's own timeout is 30 minutes). A no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield
        return
    rank = os.environ.get("RANK", "?")
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"

    def expire() -> None:
        exit_now(EXIT_DISTRIBUTED, f"error: rank {rank}: the {world} ranks did not all join the process group at "
                 f"{where} within dist.init_timeout_s={seconds:g} s (a rank that failed to start, or the port held "
                 "by an earlier run); check the other ranks' output, or raise dist.init_timeout_s")

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


_LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "socket closed")
_BACKEND = ("gloo", "nccl", "c10d", "processgroup", "torch.distributed", "pair closure")
"""Words that mark an error as the process group's own (gloo raises plain RuntimeErrors naming its sources; its
'Application timeout caused pair closure' names none)."""


def describe_failure(exc: BaseException) -> str | None:
    """One line for an error of the process group, else None: a rank that ended (its sockets closed: gloo reads
    'Connection reset/closed by peer') or a collective that waited longer than dist.timeout_s. Other errors that
    merely mention a connection (a database, a W&B server) are not the process group's."""
    import torch.distributed as distributed

    if not (distributed.is_available() and distributed.is_initialized()) or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if not (isinstance(exc, distributed.DistError) or any(word in text for word in _BACKEND)):
        return None
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if "timed out" in text or "timeout" in text:
        return (f"rank {rank}: a collective waited longer than dist.timeout_s for the other ranks of {world} (one "
                "is stuck or gone); see their output (raise dist.timeout_s if a rank is legitimately slow)")
    cause = next((m for m in _LOST_PEER if m in text), None) or first_line(exc, limit=160)
    return (f"rank {rank}: lost contact with another of the {world} ranks ({cause}: it ended, or its machine went "
            "away); the launcher names it; rerun the same command to resume from the last complete checkpoint")


__all__ = ["Dist", "build_dist", "describe_failure", "is_main_process", "process_rank",
           "teardown"]
