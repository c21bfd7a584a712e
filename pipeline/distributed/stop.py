"""The training loop's stop request, the same on every rank.

Signal handlers (`StopRequest`) only set a flag on the rank that got the signal. The loop asks `should_stop()` at
optimizer-step boundaries and after each epoch: one all-reduce of the host flags (over the gloo host group: it
never waits for the GPU), so every rank stops after the *same* step, and a rank that got no signal learns the
other's request and with it the exit code (75 or 130). The checkpointer's time-based save rides on the same
all-reduce (`agree(timed=...)`).

The run's two other stops need no vote, so they do not come here: each is decided from numbers every rank already
holds alike, at the same step. Early stopping compares validation metrics that torchmetrics has synced across ranks
(`ClassificationMetrics.compute`); the non-finite guard's verdict (`NonFiniteGuard.decide`) reads one all-reduce of
every rank's flags. A signal is the only stop one rank can know of alone.
"""

from __future__ import annotations

from typing import Sequence

from pipeline.distributed import Dist
from pipeline.exits import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopRequest


class AgreedStop:
    """A `StopRequest` whose answer every rank shares."""

    def __init__(self, dist: Dist, signal_names: Sequence[str] = ()):
        self.dist = dist
        self.request = StopRequest(signal_names)

    def install(self) -> None:
        self.request.install()

    def uninstall(self) -> None:
        self.request.uninstall()

    @property
    def interrupted(self) -> bool:
        """The stop is Ctrl-C's (exit 130), not a preemption signal's (exit 75)."""
        return self.request.interrupted

    @property
    def signal_name(self) -> str:
        return self.request.signal_name

    def agree(self, timed: bool = False) -> tuple[bool, bool]:
        """(stop now, time-based save due), the same on every rank: one all-reduce of the host flags."""
        stop = self.request
        preempt, interrupt, timed = self.dist.agree([stop.requested and not stop.interrupted, stop.interrupted,
                                                     timed])
        if preempt or interrupt:
            stop.request(stop.signal_name or "another rank's signal",
                         stop.exit_code if stop.requested else (EXIT_PREEMPTED if preempt else EXIT_INTERRUPTED))
        return preempt or interrupt, timed

    def should_stop(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it at the same point)."""
        return self.agree()[0]
