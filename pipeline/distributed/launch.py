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

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EX_TEMPFAIL = 75
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


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
    """One exit code for a set of failed ranks: 75 if any rank asked to be resumed, else the first failure's.

    Once one rank exits, torchrun sends SIGTERM to the others; a rank still finishing its own exit then
    reads as killed by SIGTERM. Such victims do not hide the code of the rank that really failed.
    """
    codes = [failure.exitcode for _, failure in sorted(failures.items())]
    if EX_TEMPFAIL in codes:
        return EX_TEMPFAIL
    causes = [code for code in codes if code != -signal.SIGTERM] or codes
    first = causes[0] if causes else 1
    return 128 - first if first < 0 else first  # a rank killed by signal N reads as 128+N, as in a shell


def main(argv: Sequence[str] | None = None) -> int:
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, _forward)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    args.signals_to_handle = TORCHRUN_SIGNALS  # torchrun's agent must leave SIGUSR1/SIGTERM to `_forward`
    try:
        launch_command(args)
    except ChildFailedError as error:
        return exit_code_of(error.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
