"""`accelerate launch` that forwards preemption signals and keeps the ranks' exit code.

`python -m pipeline.distributed.launch ARGS` takes exactly `accelerate launch`'s arguments. Two things differ,
both needed for preemption (see launch.sh and slurm/train.sbatch):

- SIGUSR1 and SIGTERM sent to the launcher are forwarded to the ranks, and the launcher then waits for them.
  Plain torchrun would die on SIGUSR1 (default action) and answers SIGTERM by terminating the ranks and killing
  them 30 s later, which can cut a checkpoint save short. SIGINT (Ctrl-C) keeps torchrun's behaviour.
- The exit code is the ranks' own: 75 (EX_TEMPFAIL) when they stopped for preemption, 76 when a rank timed out
  waiting (a collective past dist.timeout_s, a loader worker past data.worker_timeout_s), where torchrun would
  turn any failing rank into exit code 1.

A rank that timed out says so in a file of the folder `REPORTS_ENV` names (`report_timeout`): torchrun then ends
the rank that was stuck (SIGTERM, SIGKILL 30 s later: 137), and that death must not read as the cause.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from pipeline.exits import EXIT_DISTRIBUTED, EXIT_INTERRUPTED, EXIT_PREEMPTED, ignore_stop_signals

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"
REPORTS_ENV = "PIPELINE_LAUNCH_REPORTS"
"""The folder where a rank that timed out leaves its rank number (set by `main` for the ranks)."""


def report_timeout() -> None:
    """In a rank that ends because it waited too long (a collective, a loader worker): tell `main` it was not a
    victim (a no-op when not started by it)."""
    folder = os.environ.get(REPORTS_ENV)
    if folder:
        try:
            Path(folder, f"timeout-{int(os.environ.get('RANK', '0') or 0)}").touch()
        except OSError:
            pass


def _timed_out_ranks(folder: str | None) -> set[int]:
    if not folder:
        return set()
    return {int(p.name.split("-", 1)[1]) for p in Path(folder).glob("timeout-*") if p.name.split("-", 1)[1].isdigit()}


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


def exit_code_of(failures: dict, timed_out: set[int] = frozenset()) -> int:
    """One exit code for a set of failed ranks: 75 if any rank asked to be resumed, 130 if they stopped for
    Ctrl-C, 76 if a rank (in `timed_out`) ended because it waited too long for another, else the first failure's.

    Once one rank exits, torchrun sends SIGTERM to the others, and the others may notice it first as a lost
    peer (exit 76); a rank still finishing its own exit then reads as killed by SIGTERM. Such victims do not
    hide the code of the rank that really failed (137 for one killed by SIGKILL, e.g. the OOM killer).
    """
    return _shell_code(_cause(failures, timed_out)[1])


def _cause(failures: dict, timed_out: set[int] = frozenset()) -> tuple[int, int]:
    """(rank, exit code) of the failure that explains the others; see `exit_code_of`."""
    ranked = sorted((rank, failure.exitcode) for rank, failure in failures.items())
    for wanted in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        if any(code == wanted for _, code in ranked):
            return next(item for item in ranked if item[1] == wanted)
    waited = [item for item in ranked if item[0] in timed_out and item[1] == EXIT_DISTRIBUTED]
    if waited:  # the stuck rank was then ended by torchrun (137 or 143): a victim, not the cause
        return waited[0]
    causes = [item for item in ranked if item[1] not in (-signal.SIGTERM, EXIT_DISTRIBUTED)] or ranked
    return causes[0] if causes else (0, 1)


def _shell_code(code: int) -> int:
    return 128 - code if code < 0 else code  # a rank killed by signal N reads as 128+N, as in a shell


def describe(failures: dict, timed_out: set[int] = frozenset()) -> str:
    """One line naming the rank whose failure ended the job."""
    rank, code = _cause(failures, timed_out)
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        return ""
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    if rank in timed_out:
        how += " after waiting longer than its timeout for another rank or a loader worker (its line says which)"
    return f"launch: rank {rank} {how}; the job ends with exit code {_shell_code(code)}"


def main(argv: Sequence[str] | None = None) -> int:
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, _forward)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    args.signals_to_handle = TORCHRUN_SIGNALS  # torchrun's agent must leave SIGUSR1/SIGTERM to `_forward`
    reports = os.environ[REPORTS_ENV] = tempfile.mkdtemp(prefix="pipeline-launch-")
    try:
        launch_command(args)
    except ChildFailedError as error:
        ignore_stop_signals()  # the code is decided: a repeated signal must not change it during teardown
        timed_out = _timed_out_ranks(reports)
        line = describe(error.failures, timed_out)
        if line:
            print(line, file=sys.stderr, flush=True)
        return exit_code_of(error.failures, timed_out)
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    ignore_stop_signals()
    return 0


if __name__ == "__main__":
    sys.exit(main())
