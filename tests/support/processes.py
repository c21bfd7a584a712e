"""A command's processes, watched from /proc: each one's state and parent, every descendant (whatever session it
moved to), and `run_watched`, which runs a command, signals it on cue and reports how it ended and what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.conftest import ROOT

GONE_WITHIN_S = 10.0  # from the command's exit until every process it started has ended


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: [state, ppid, ...]; a vanished process reads as a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):  # gone, even between listing and reading
        return ["Z"]


@dataclass
class Ended:
    code: int
    stdout: str
    stderr: str
    seconds: float  # from the trigger (message or first signal) to the exit
    pids: set[int] = field(default_factory=set)  # every process of the run seen while it ran
    left: list[int] = field(default_factory=list)  # those still alive GONE_WITHIN_S after the exit


def live_stat(pid: int) -> list[str] | None:
    """[state, ppid, ...] of a live process, None if it is gone (or a zombie: it has ended)."""
    fields = proc_stat(pid)
    return None if fields[0] in ("Z", "X") else fields


def descendants(root: int, known: set[int]) -> set[int]:
    """`known` plus every live process whose parent chain reaches `root` or a process already known."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = live_stat(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    found = set(known)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if pid not in found and (ppid == root or ppid in found):
                found.add(pid)
                changed = True
    return found


def run_watched(cmd: list[str], tmp_path: Path, env: dict | None = None, signals: tuple[str, ...] = (),
                gap_s: float = 0.3, trigger: str = "epoch 1/", message: str = "error:",
                timeout_s: float = 240.0, target: Callable[[int], list[int]] | None = None,
                gone_within_s: float = GONE_WITHIN_S, last_output: str = "") -> Ended:
    """Run `cmd`; once `trigger` is in its stdout send `signals` (`gap_s` apart) to it, or to the processes
    `target(pid of cmd)` names (once it names any). `seconds` counts from the first signal, or else from the
    moment `message` appeared in stderr (or, if given, `last_output` in stdout), to the exit."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"  # files, not pipes: a surviving worker would hold a pipe
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    pids: set[int] = set()
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=stdout, stderr=stderr, start_new_session=True)
    started, since, pending = time.monotonic(), None, list(signals)
    try:
        while proc.poll() is None:
            assert time.monotonic() - started < timeout_s, f"no exit within {timeout_s} s:\n{err.read_text()[-3000:]}"
            pids = descendants(proc.pid, pids | {proc.pid})
            if pending and trigger in out.read_text():
                receivers = target(proc.pid) if target else [proc.pid]
                if receivers:
                    since = since or time.monotonic()
                    signum = getattr(signal, pending.pop(0))
                    for pid in receivers:
                        os.kill(pid, signum)
                    time.sleep(gap_s if pending else 0.0)
                    continue
            if since is None and not signals and message in err.read_text():
                since = time.monotonic()
            if last_output and last_output in out.read_text():
                since, last_output = time.monotonic(), ""
            time.sleep(0.05)
        ended = time.monotonic()
        if since is None and message in err.read_text():
            since = ended  # the message came in the last poll interval
        left = sorted(pids - {proc.pid})
        while left and time.monotonic() - ended < gone_within_s:
            time.sleep(0.1)
            left = [pid for pid in left if live_stat(pid) is not None]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in descendants(proc.pid, pids):  # whatever happens, leave nothing running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return Ended(proc.returncode, out.read_text(), err.read_text(), ended - (since or started), pids, left)
