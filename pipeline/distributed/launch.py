"""`accelerate launch` that forwards preemption signals and keeps the ranks' exit code.

`python -m pipeline.distributed.launch ARGS` takes exactly `accelerate launch`'s arguments. Two things differ,
both needed for preemption (see launch.sh and slurm/train.sbatch):

- SIGUSR1 and SIGTERM sent to the launcher are forwarded to the ranks, and the launcher then waits for them.
  Plain torchrun would die on SIGUSR1 (default action) and answers SIGTERM by terminating the ranks and killing
  them 30 s later, which can cut a checkpoint save short. SIGINT (Ctrl-C) keeps torchrun's behaviour.
- The exit code is the ranks' own: 75 (EX_TEMPFAIL) when they stopped for preemption, where torchrun would
  turn any failing rank into exit code 1.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Sequence

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EX_TEMPFAIL = 75
EX_INTERRUPTED = 130
EX_LOST_RANK = 76  # what a rank says when another one ended under it (pipeline.distributed.EXIT_DISTRIBUTED)
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"


def _child_pids(parent: int) -> list[int]:
    """Direct children of `parent` (Linux /proc; elsewhere none are found and nothing is forwarded)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _forward(signum: int, _frame: object) -> None:
    for pid in _child_pids(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def exit_code_of(failures: dict) -> int:
    """One exit code for a set of failed ranks: 75 if any rank asked to be resumed, 130 if they stopped for
    Ctrl-C, else the first failure's.

    Once one rank exits, torchrun sends SIGTERM to the others, and the others may notice it first as a lost
    peer (exit 76); a rank still finishing its own exit then reads as killed by SIGTERM. Such victims do not
    hide the code of the rank that really failed (137 for one killed by SIGKILL, e.g. the OOM killer).
    """
    return _shell_code(_cause(failures)[1])


def _cause(failures: dict) -> tuple[int, int]:
    """(rank, exit code) of the failure that explains the others; see `exit_code_of`."""
    ranked = sorted((rank, failure.exitcode) for rank, failure in failures.items())
    for wanted in (EX_TEMPFAIL, EX_INTERRUPTED):
        if any(code == wanted for _, code in ranked):
            return next(item for item in ranked if item[1] == wanted)
    causes = [item for item in ranked if item[1] not in (-signal.SIGTERM, EX_LOST_RANK)] or ranked
    return causes[0] if causes else (0, 1)


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code  # a rank killed by signal N reads as 128+N, as in a shell


def describe(failures: dict) -> str:
    """One line naming the rank whose failure ended the job."""
    rank, code = _cause(failures)
    if code in (EX_TEMPFAIL, EX_INTERRUPTED):
        return ""
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return f"launch: rank {rank} {how}; the job ends with exit code {_shell_code(code)}"


def main(argv: Sequence[str] | None = None) -> int:
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, _forward)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from pipeline.training.preemption import ignore_stop_signals

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    args.signals_to_handle = TORCHRUN_SIGNALS  # torchrun's agent must leave SIGUSR1/SIGTERM to `_forward`
    try:
        launch_command(args)
    except ChildFailedError as error:
        ignore_stop_signals()  # the code is decided: a repeated signal must not change it during teardown
        line = describe(error.failures)
        if line:
            print(line, file=sys.stderr, flush=True)
        return exit_code_of(error.failures)
    ignore_stop_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
