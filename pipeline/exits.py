"""How a run ends: every exit code, the exceptions that carry one, and the stop signals (no torch; it imports only
`pipeline.errors`).

code  name              meaning                                                      who ends with it
0                       done                                                         every command
1                       crashed: an error no code is designed for (a traceback)      Python
2     EXIT_USAGE        bad input: config, files, values; a URL naming nothing       the CLI; PermanentError (data)
65    EXIT_BAD_DATA     the data is bad: data.max_bad_fraction exceeded, or a shard  DataQualityError,
                        changed during the run (EX_DATAERR)                          UndecodableBatch, ShardChanged
                                                                                     (pipeline.data)
69    EXIT_REMOTE_DATA  remote data cannot be had after the retries (EX_UNAVAILABLE) NetworkError (pipeline.data)
70    EXIT_NONFINITE    training stopped on non-finite values (EX_SOFTWARE)          NonFiniteStop
74    EXIT_IO           a file could not be written: disk full, permissions          CheckpointWriteError; the CLI
                        (EX_IOERR)                                                   for any other OSError
75    EXIT_PREEMPTED    a stop signal ended the run, its checkpoint written: requeue Preempted, SignalStop; the
                        me (EX_TEMPFAIL; resume=auto continues from it)              launcher passes it on
76    EXIT_DISTRIBUTED  a rank was lost, a collective timed out, the process group   the CLI, pipeline.distributed,
                        did not form (EX_PROTOCOL)                                   the launcher
76    EXIT_STUCK        a loader worker delivered nothing for data.worker_timeout_s: WorkerStuck (pipeline.data)
                        a process of the run stopped answering, as a lost rank
130   EXIT_INTERRUPTED  Ctrl-C (128 + SIGINT, as a shell reports it)                 Interrupted, SignalStop

An exception carries its code as `exit_code` (and `same_on_every_rank` when every rank stops with the same
message, which rank 0 prints); the CLI matches the attribute, so it never imports torch to learn a code. Every such
exception is defined here, whichever package raises it (tests/test_architecture.py holds every other module to it).
docs/preemption.md, "Faults and failures", tells each path with its line and its checkpoint rule.

Stop requests: signals (SLURM preemption, time limits, Ctrl-C), and what a repeated signal does.
Inside the training loop a signal only sets a flag; the loop asks at optimizer-step boundaries and after each
epoch, all-reducing the flags so every rank stops after the *same* step, then checkpoints and exits: with
`EXIT_PREEMPTED` (75, "requeue me") for the signals in `checkpoint.signals`, with `EXIT_INTERRUPTED` (130, as a
shell reports Ctrl-C) for SIGINT. Outside the loop (setup, the final test) there is nothing to checkpoint: the
first signal stops the command at once with the same codes (`CommandSignals`).

Whatever the phase, once a stop is under way a further stop signal never changes the exit code: SIGTERM or
SIGUSR1 again is ignored, and SIGINT again ends the process at once with the code the first request chose.
"""

from __future__ import annotations

import os
import signal
from typing import Sequence

from pipeline.errors import raised_again_line

EXIT_USAGE = 2
"""Bad input: config, files, values (the CLI, for ConfigError, FileNotFoundError, ValueError, KeyError)."""
EXIT_BAD_DATA = 65
"""EX_DATAERR: data.max_bad_fraction exceeded, or a shard changed during the run."""
EXIT_REMOTE_DATA = 69
"""EX_UNAVAILABLE: remote data cannot be had after the retries (a service is unavailable)."""
EXIT_NONFINITE = 70
"""EX_SOFTWARE: training stopped on non-finite values (train.nonfinite)."""
EXIT_IO = 74
"""EX_IOERR: a file could not be written (disk full, permissions), a checkpoint or any other."""
EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: try again later; resume=auto continues from the checkpoint."""
EXIT_DISTRIBUTED = 76
"""EX_PROTOCOL: a rank was lost, a collective timed out, or the process group did not form."""
EXIT_STUCK = 76
"""Exit code of a stuck loader worker: a process of the run stopped answering, as a lost rank or a collective
past dist.timeout_s (`EXIT_DISTRIBUTED`); docs/preemption.md, "Faults and failures"."""
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for Ctrl-C."""
STOP_CODES = (EXIT_PREEMPTED, EXIT_INTERRUPTED)
"""The codes of a stop asked for by a signal."""
SIGNAL_NAMES = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP")
"""The stop signals `checkpoint.signals` may name (SIGINT is always handled)."""


class NonFiniteStop(RuntimeError):
    """Training stopped on non-finite values; the CLI prints the one-line message and exits with 70."""

    exit_code = EXIT_NONFINITE
    same_on_every_rank = True


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions...); the message is one line naming the folder."""

    exit_code = EXIT_IO
    same_on_every_rank = True


class DataQualityError(ValueError):
    """Too many bad samples (data.max_bad_fraction exceeded; `pipeline.data.samples.faults`); the message is one
    line."""

    exit_code = EXIT_BAD_DATA
    same_on_every_rank = True  # every rank stops with the same totals; rank 0 says it


class UndecodableBatch(DataQualityError):
    """A training batch in which no image decodes (met by one rank's main process: that rank says it)."""

    same_on_every_rank = False


class WorkerStuck(RuntimeError):
    """A loader worker delivered nothing for data.worker_timeout_s (stuck in a read, stopped): the run ends with
    `EXIT_STUCK` and this one line; the workers are ended as on every exit path (`pipeline.data.workers`)."""

    exit_code = EXIT_STUCK


class RemoteError(OSError):
    """The shard reader's own errors (`pipeline.data.io`): one line, kept when torch's DataLoader raises one again
    in the main process."""

    def __init__(self, message: str) -> None:
        super().__init__(raised_again_line(message))


class PermanentError(RemoteError):
    """A failure that retrying cannot fix (HTTP 404/403, missing object, ...); the message is one line.
    On the command line it is bad input, as a missing local file is: the URL names nothing readable."""

    exit_code = EXIT_USAGE


class NetworkError(RemoteError):
    """A remote read given up after `ReadOptions.retries` retries (the server fails, stalls, is too slow or
    cannot be reached)."""

    exit_code = EXIT_REMOTE_DATA


class ShardChanged(PermanentError):
    """A shard that answers another size or version than the index recorded (`ReadOptions.pinned`): reading on
    would mix two versions of the data in one run, which is bad data."""

    exit_code = EXIT_BAD_DATA


class Preempted(Exception):
    """Raised after the stop checkpoint is written; the CLI turns it into exit code 75."""

    exit_code = EXIT_PREEMPTED


class Interrupted(Preempted):
    """Raised after the checkpoint that Ctrl-C asked for is written; exit code 130."""

    exit_code = EXIT_INTERRUPTED


class SignalStop(BaseException):
    """A stop signal outside the training loop: nothing to checkpoint, the command ends now (a BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way swallows it)."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name, self.exit_code = signal_name, exit_code


def exit_now(code: int, line: str) -> None:
    """End the process at once with `code` after one line on stderr (written directly: a signal handler may
    interrupt a print in progress). The loader's workers and helper processes leave once this process is gone
    (see `pipeline.data.workers`); the last complete checkpoint stays what resume continues from."""
    os.write(2, f"{line}\n".encode())
    os._exit(code)


def ignore_stop_signals() -> None:
    """For the last moments of a process whose exit code a stop already decided: Python's own teardown puts back
    the default handlers of the signals it handled, so a signal repeated then would still kill the process (exit
    143, 138). Ignored signals stay ignored through teardown."""
    for name in SIGNAL_NAMES:
        try:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def _code_of(name: str, preempt_names: Sequence[str] = ()) -> int:
    return EXIT_PREEMPTED if name in preempt_names or name != "SIGINT" else EXIT_INTERRUPTED


def _repeated(name: str, code: int) -> None:
    """A stop signal while a stop with `code` is under way: SIGINT exits at once with that code; others change
    nothing."""
    if name == "SIGINT":
        exit_now(code, f"interrupted again ({name}): exiting now with code {code}; resume continues from the last "
                 "complete checkpoint")


class StopRequest:
    """The training loop's stop flags, set by signal handlers (installed on the main thread of every rank).

    Handles the signals in `signal_names` (preemption: exit 75) and SIGINT (exit 130 unless it is listed)."""

    def __init__(self, signal_names: Sequence[str] = ()):
        self.signal_names = list(signal_names)
        self.requested = False
        self.signal_name = ""
        self.exit_code = EXIT_PREEMPTED
        self._previous: dict[int, object] = {}

    @property
    def handled(self) -> list[str]:
        return [*self.signal_names, *([] if "SIGINT" in self.signal_names else ["SIGINT"])]

    @property
    def interrupted(self) -> bool:
        """The request is Ctrl-C's (exit 130), not a preemption signal's (exit 75)."""
        return self.requested and self.exit_code == EXIT_INTERRUPTED

    def install(self) -> None:
        for name in self.handled:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a tuning worker thread)
                pass

    def uninstall(self) -> None:
        """Restore the previous handlers, unless a stop is under way: then a later signal must still find this
        handler, which ignores it (or, for SIGINT, exits with the code already chosen)."""
        if self.requested:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def request(self, signal_name: str, exit_code: int) -> None:
        """Record a stop (a signal here, or another rank's, learnt by agreement); the first one decides."""
        if not self.requested:
            self.requested, self.signal_name, self.exit_code = True, signal_name, exit_code

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            _repeated(name, self.exit_code)
            return
        self.request(name, _code_of(name, self.signal_names))


class CommandSignals:
    """Signal handling for a whole command, outside the training loop (which installs its own `StopRequest`).

    The first SIGINT (or, for training commands, SIGTERM or SIGUSR1) raises `SignalStop`, which the CLI turns
    into one line and exit 130 (SIGINT) or 75; a second one while that exit is under way ends the process at
    once with the same code. Without this, Ctrl-C printed a KeyboardInterrupt traceback, and a SIGTERM during
    setup or the final test killed the process without the CLI's cleanup."""

    def __init__(self, signal_names: Sequence[str] = ("SIGINT",)):
        self.signal_names = list(signal_names)
        self.stopping: SignalStop | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "CommandSignals":
        for name in self.signal_names:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stopping is None:  # else stay: a late signal must not kill the exit in progress
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)

    def ended(self, code: int) -> None:
        """The command is ending with `code`: if that is a stop's (75, 130), keep the handlers to the end of the
        process, so that a signal sent again meanwhile is ignored (SIGINT: exits at once, with `code`)."""
        if code in STOP_CODES and self.stopping is None:
            self.stopping = SignalStop("", code)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.stopping is not None:
            _repeated(name, self.stopping.exit_code)
            return
        self.stopping = SignalStop(name, _code_of(name))
        raise self.stopping
