"""The parts the trainer asks: accumulation windows worked out once, and a stop request agreed across ranks."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.distributed.stop import AgreedStop
from pipeline.exits import EXIT_INTERRUPTED, EXIT_PREEMPTED
from pipeline.training.accumulation import AccumulationWindows


def test_windows_cover_the_epoch_with_a_short_last_one() -> None:
    windows = AccumulationWindows(7, 3)
    assert windows.optimizer_steps == 3
    assert [windows.window(m) for m in range(7)] == [(3, False), (3, False), (3, True), (3, False), (3, False),
                                                     (3, True), (1, True)]
    assert AccumulationWindows(6, 1).optimizer_steps == 6 and AccumulationWindows(6, 1).window(5) == (1, True)
    assert sum(last for _, last in map(AccumulationWindows(40, 4).window, range(40))) == 10


def _stop(others: list[bool]) -> AgreedStop:
    """A stop request on a rank whose peers hold `others` (preempt, interrupt, timed): agree ORs them in."""
    dist = SimpleNamespace(agree=lambda flags: [a or b for a, b in zip(flags, others)])
    return AgreedStop(dist, ["SIGUSR1"])


def test_a_rank_without_the_signal_learns_the_request_and_its_exit_code() -> None:
    quiet = _stop([False, False, False])
    assert quiet.should_stop() is False and quiet.agree(timed=True) == (False, True)
    preempted = _stop([True, False, False])
    assert preempted.should_stop() and preempted.request.exit_code == EXIT_PREEMPTED
    assert preempted.signal_name == "another rank's signal" and not preempted.interrupted
    interrupted = _stop([False, True, False])
    assert interrupted.agree() == (True, False) and interrupted.interrupted
    assert interrupted.request.exit_code == EXIT_INTERRUPTED


def test_the_own_signal_decides_the_code() -> None:
    stop = _stop([True, False, False])
    stop.request.request("SIGINT", EXIT_INTERRUPTED)
    assert stop.should_stop() and stop.signal_name == "SIGINT" and stop.request.exit_code == EXIT_INTERRUPTED
