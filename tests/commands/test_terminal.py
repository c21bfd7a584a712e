"""`pipeline train` on a real pseudo-terminal, rendered by a terminal emulator (pyte) at 80 and 120 columns: the
progress bar never swallows an epoch line, each epoch line is one row, and the run ends saying what to do next."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pyte = pytest.importorskip("pyte")

ROWS = 300  # tall enough that nothing scrolls away: the whole run stays on the screen


def render_in_terminal(args: list[str], columns: int, timeout: float = 240) -> tuple[int, list[str]]:
    """Run `python -m pipeline ARGS` with stdout and stderr on one pty of `columns` x ROWS; return the exit code
    and the screen's non-blank rows as a terminal would show them at the end."""
    screen = pyte.Screen(columns, ROWS)
    stream = pyte.ByteStream(screen)
    leader, follower = pty.openpty()
    import fcntl
    import struct
    import termios

    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, columns, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color", "COLUMNS": str(columns),
           "LINES": str(ROWS)}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env, stdin=follower,
                               stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                stream.feed(data)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    return code, [row.rstrip() for row in screen.display if row.strip()]


@pytest.mark.parametrize("columns", [80, 120])
def test_epoch_lines_stay_whole_under_the_progress_bar(digits_root: Path, columns: int) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="tty", dir="/tmp"))  # a short path: the commands fit one row
    args = ["train", f"data.root={digits_root}", "model.channels=[8,16]", "data.image_size=8", "train.batch_size=32",
            "logging.wandb_mode=disabled", "train.epochs=3", f"run.output_dir={tmp_path}", "run.name=tty",
            "logging.progress=true"]
    code, rows = render_in_terminal(args, columns)
    shown = "\n".join(rows)
    assert code == 0, shown
    epoch_rows = [r for r in rows if r.startswith("epoch ") and not r.startswith("epochs")]
    # One row per epoch, each starting the row and whole (the time and, here, 'best' end it on that row).
    assert [r.split()[1] for r in epoch_rows] == ["1/3", "2/3", "3/3"], shown
    assert all(r.split("  ")[1].startswith("loss ") and r.endswith(("s", "best")) for r in epoch_rows), shown
    assert all(len(r) <= columns for r in epoch_rows)
    # The transient bar is gone and never shared a row with a printed line.
    assert not any(r.startswith("epochs ") or "ETA" in r for r in rows), shown
    # The end says what happened and what next.
    run_dir = tmp_path / "tty"
    best = next(r for r in rows if r.startswith("best epoch "))
    assert "val/accuracy" in best and "wall time" in best
    assert f"best weights: {run_dir / 'checkpoints' / 'best'}" in rows
    for command in ("evaluate", "report", "export", "predict"):
        assert any(r.startswith(f"  pipeline {command} {run_dir}") for r in rows), (command, shown)
    shutil.rmtree(tmp_path)
