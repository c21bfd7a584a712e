"""Stop requests: signals (SLURM preemption, time limits), fault injection for tests.

A signal only sets a flag; the loop asks `StopRequest.agreed()` at optimizer-step boundaries, which
all-reduces the flag so every rank stops after the *same* step, then checkpoints and exits with
`EXIT_PREEMPTED`. Job schedulers treat that code as "requeue me".
"""

from __future__ import annotations

import os
import signal
from typing import Sequence

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later; resume=auto continues from the checkpoint
PREEMPTED_MARKER = "PREEMPTED"


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI turns it into exit code 75."""

    exit_code = EXIT_PREEMPTED


class StopRequest:
    """A flag set by signal handlers (installed on the main thread of every rank)."""

    def __init__(self, signal_names: Sequence[str] = ()):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}
        self.signal_names = list(signal_names)

    def install(self) -> None:
        for name in self.signal_names:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a tuning worker thread)
                pass

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def maybe_inject_fault(global_step: int, saved: bool, rank: int) -> None:
    """Test hook: `PIPELINE_KILL_AT_STEP=N` SIGKILLs rank 0 right after optimizer step N
    (`PIPELINE_KILL_AFTER_SAVE=1`: only once that step's checkpoint is complete)."""
    target = os.environ.get("PIPELINE_KILL_AT_STEP")
    if target is None or rank != 0 or global_step != int(target):
        return
    if os.environ.get("PIPELINE_KILL_AFTER_SAVE") == "1" and not saved:
        return
    os.kill(os.getpid(), signal.SIGKILL)
