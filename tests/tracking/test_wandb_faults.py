"""W&B that cannot be reached, hangs, has no credentials or raises: training goes on offline (or with the null
tracker) within its timeout, never prompting."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline.config.schema import LoggingConfig
from pipeline.tracking import wandb_logger
from pipeline.tracking.wandb_logger import NullTracker, WandbTracker, build_tracker
from tests.conftest import free_port


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


def _timed_tracker(run_dir: Path, base_url: str, timeout: float = 2.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    logging = LoggingConfig(wandb_mode="online", wandb_project="pipeline-tests", wandb_base_url=base_url,
                            wandb_init_timeout=timeout, wandb_finish_timeout=5.0)
    tracker = build_tracker(run_dir, logging, "t", {"a": 1}, True)
    return tracker, time.monotonic() - started


def _offline_baseline(run_dir: Path) -> float:
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    build_tracker(run_dir, LoggingConfig(wandb_project="pipeline-tests"), "t", {"a": 1}, True).finish()
    return time.monotonic() - started


def _assert_offline(tracker, run_dir: Path) -> None:
    assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_wandb_nothing_listening_falls_back_offline(tmp_path: Path, wandb_env, capsys) -> None:
    port = free_port()  # bound, then closed: connection refused
    tracker, seconds = _timed_tracker(tmp_path / "r", f"http://127.0.0.1:{port}")
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(f"warning: W&B server http://127.0.0.1:{port} unusable (ConnectionRefusedError")
    assert line.endswith(f"logging offline to {tmp_path / 'r' / 'wandb'} (upload later with `wandb sync`)")
    _assert_offline(tracker, tmp_path / "r")
    assert seconds - _offline_baseline(tmp_path / "base") < 15


def test_wandb_silent_server_falls_back_offline_within_the_timeout(tmp_path: Path, wandb_env, capsys) -> None:
    with socket.socket() as server:  # accepts connections (kernel backlog) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        tracker, seconds = _timed_tracker(tmp_path / "r", f"http://127.0.0.1:{port}", timeout=2.0)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert f"W&B server http://127.0.0.1:{port} unusable (" in line and "logging offline" in line
    _assert_offline(tracker, tmp_path / "r")
    assert 1.5 < seconds < 2.0 + 15


class _AnswersProbeOnly(http.server.BaseHTTPRequestHandler):
    """Answers HEAD (so the server looks alive) but never answers wandb's POST /graphql."""

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()

    def do_POST(self) -> None:  # noqa: N802
        time.sleep(30)

    def log_message(self, *args) -> None:
        pass


def test_wandb_init_that_hangs_falls_back_offline(tmp_path: Path, wandb_env, capsys) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnswersProbeOnly)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracker, seconds = _timed_tracker(tmp_path / "r", f"http://127.0.0.1:{server.server_port}", timeout=2.0)
    finally:
        server.shutdown()
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith("warning: W&B could not start in online mode (CommError: ") and "logging offline" in line
    _assert_offline(tracker, tmp_path / "r")
    assert seconds - _offline_baseline(tmp_path / "base") < 15


def test_wandb_without_credentials_never_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    tracker, _ = _timed_tracker(tmp_path / "r", "http://127.0.0.1:9")
    err = capsys.readouterr().err
    assert "no W&B credentials for 127.0.0.1 (set WANDB_API_KEY or run `wandb login`)" in err
    _assert_offline(tracker, tmp_path / "r")


def test_wandb_call_that_raises_turns_the_tracker_off(tmp_path: Path, monkeypatch, capsys) -> None:
    tracker = build_tracker(tmp_path, LoggingConfig(wandb_project="pipeline-tests"), "t", {}, True)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ConnectionResetError("connection lost")

    monkeypatch.setattr(tracker.run, "log", broken)
    run = tracker.run
    tracker.log({"loss": 1.0}, step=1)  # warns, does not raise
    tracker.log({"loss": 2.0}, step=2)  # off: not even attempted
    tracker.summary({"x": 1.0})
    assert calls == [1] and tracker.run is None
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert err == ["warning: W&B log failed (ConnectionResetError: connection lost); W&B logging is off for the rest "
                   "of this run (metrics.jsonl has everything)"]
    run.finish()


def test_wandb_that_cannot_start_at_all_gives_the_null_tracker(tmp_path: Path, monkeypatch, capsys) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("wandb-core did not start")

    monkeypatch.setattr(wandb_logger.WandbTracker, "__init__", refuse)
    assert isinstance(build_tracker(tmp_path, LoggingConfig(wandb_project="p"), "t", {}, True), NullTracker)
    assert "continuing without W&B (metrics.jsonl has everything)" in capsys.readouterr().err
