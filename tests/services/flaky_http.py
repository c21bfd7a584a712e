"""HTTP servers on 127.0.0.1 for tests: a deliberately unreliable one, and Python's own static one.

    from tests.services.flaky_http import serve
    with serve(folder, drop_every_bytes=50_000, fail_first_n=2, ranges=True) as server:
        tar_samples(f"{server.url}/train-000000.tar", 0, None, ReadOptions(backoff_s=0.01))
        server.log    # what it did, one Event per request: status, bytes sent, whether it dropped
        server.drops  # connections it cut mid-body (noticed_drops: those the client came back after)
        server.failures  # requests answered 503

What the flaky server does, deterministically:
- `fail_first_n`: the first n GET requests (over all files) are answered `fail_status` (503).
- `drop_every_bytes=K`: for each file, the connection is cut once at each absolute offset K, 2K, ...
  (the Content-Length promised the whole body): a client that resumes gets past it the next time,
  with or without Range support. `stall_s` > 0 waits that long before cutting (a client timeout test).
- `ranges`: `Range: bytes=N-` is answered 206 from byte N; False: ignored (200, whole file).
- `always_fail`: file names always answered `fail_status`.
- `head_status`: HEAD requests answered with this status (e.g. 501, 405; 403 as to S3 presigned GET URLs).
- `html`: file names answered 200 with `HTML_PAGE` (text/html) instead of their bytes, as a login page would be.
- `trickle`: file names whose body is sent at `trickle_bytes_per_s` (a server that never stalls, never delivers).
- `swap`: name -> (n, other file name): after n GETs of `name`, its bytes, size and ETag are the other file's
  (a shard replaced on the server during a run).
HEAD requests answer Content-Length, ETag and Last-Modified and are never failed (unless `head_status`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in.</body></html>\n"


@dataclass
class Event:
    method: str
    name: str
    status: int
    start: int = 0
    """First byte sent (the Range asked for, when honoured)."""
    sent: int = 0
    """Body bytes sent."""
    dropped: bool = False


@dataclass
class FlakyServer:
    url: str
    folder: Path
    drop_every_bytes: int = 0
    fail_first_n: int = 0
    ranges: bool = True
    fail_status: int = 503
    always_fail: tuple[str, ...] = ()
    stall_s: float = 0.0
    head_status: int = 0
    html: tuple[str, ...] = ()
    trickle: tuple[str, ...] = ()
    trickle_bytes_per_s: float = 2.0
    swap: dict[str, tuple[int, str]] = field(default_factory=dict)
    log: list[Event] = field(default_factory=list)
    dropped_at: dict[str, set[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, name: str | None = None) -> list[Event]:
        return [e for e in self.log if e.method == "GET" and (name is None or e.name == name)]

    @property
    def drops(self) -> int:
        return sum(e.dropped for e in self.log)

    @property
    def noticed_drops(self) -> int:
        """Cuts a client came back after (a cut past the last byte it needed goes unnoticed, rightly)."""
        gets = self.gets()
        return sum(e.dropped and any(later.name == e.name for later in gets[i + 1:]) for i, e in enumerate(gets))

    @property
    def failures(self) -> int:
        return sum(e.status == self.fail_status for e in self.log)

    def next_cut(self, name: str, start: int, size: int) -> int:
        """Where the body sent from `start` is cut (size: not cut); records the cut."""
        if not self.drop_every_bytes:
            return size
        step = self.drop_every_bytes
        with self.lock:
            done = self.dropped_at.setdefault(name, set())
            for cut in range((start // step + 1) * step, size, step):
                if cut not in done:
                    done.add(cut)
                    return cut
        return size


class _FlakyHandler(BaseHTTPRequestHandler):
    server_state: FlakyServer

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        path = self._file()
        if path is not None and self.server_state.head_status:
            self._record("HEAD", self.server_state.head_status)
            self.send_error(self.server_state.head_status)
        elif path is not None and path.name in self.server_state.html:
            self._record("HEAD", 200)
            self._html_headers()
        elif path is not None:
            self._record("HEAD", 200)
            self._headers(200, path.stat().st_size, path)

    def _html_headers(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(HTML_PAGE)))
        self.end_headers()

    def do_GET(self) -> None:
        state, path = self.server_state, self._file()
        if path is None:
            return
        with state.lock:
            failing = state.fail_first_n > len(state.gets()) or path.name in state.always_fail
        if failing:  # (recorded first: the client may act on the answer before this thread goes on)
            self._record("GET", state.fail_status)
            self.send_error(state.fail_status)
            return
        if path.name in state.html:
            self._record("GET", 200, 0, len(HTML_PAGE))
            self._html_headers()
            self.wfile.write(HTML_PAGE)
            return
        if path.name in state.swap:
            after, other = state.swap[path.name]
            if len(state.gets(path.name)) >= after:
                path = state.folder / other
        size = path.stat().st_size
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        start = int(match.group(1)) if match and state.ranges else 0
        self._send_body(path, start, size)

    def _send_body(self, path: Path, start: int, size: int) -> None:
        state = self.server_state
        cut = state.next_cut(path.name, start, size)
        status = 206 if start or (state.ranges and "Range" in self.headers) else 200
        self._record("GET", status, start, cut - start, cut < size)
        self._headers(status, size - start, path, f"bytes {start}-{size - 1}/{size}" if status == 206 else None)
        with open(path, "rb") as handle:
            handle.seek(start)
            try:
                if path.name in state.trickle:
                    self._trickle(handle.read(cut - start))
                else:
                    self.wfile.write(handle.read(cut - start))
                self.wfile.flush()
            except OSError:  # the client went away
                pass
        if cut < size:
            time.sleep(state.stall_s)
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _trickle(self, body: bytes) -> None:
        """A byte at a time, at trickle_bytes_per_s, until the client goes away (then writing raises)."""
        pause = 1.0 / self.server_state.trickle_bytes_per_s
        for position in range(len(body)):
            self.wfile.write(body[position:position + 1])
            self.wfile.flush()
            time.sleep(pause)

    def _file(self) -> Path | None:
        name = self.path.lstrip("/").split("?", 1)[0]
        path = self.server_state.folder / name
        if "/" in name or ".." in name or not path.is_file():
            self._record(self.command, 404)
            self.send_error(404)
            return None
        return path

    def _headers(self, status: int, length: int, path: Path, content_range: str | None = None) -> None:
        info = path.stat()
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", f'"{info.st_size:x}-{info.st_mtime_ns:x}"')
        self.send_header("Last-Modified", formatdate(info.st_mtime, usegmt=True))
        if self.server_state.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if content_range:
            self.send_header("Content-Range", content_range)
        self.end_headers()

    def _record(self, method: str, status: int, start: int = 0, sent: int = 0, dropped: bool = False) -> None:
        with self.server_state.lock:
            self.server_state.log.append(Event(method, self.path.lstrip("/"), status, start, sent, dropped))


@contextlib.contextmanager
def serve(folder: str | os.PathLike, drop_every_bytes: int = 0, fail_first_n: int = 0, ranges: bool = True,
          fail_status: int = 503, always_fail: tuple[str, ...] = (), stall_s: float = 0.0, head_status: int = 0,
          html: tuple[str, ...] = (), trickle: tuple[str, ...] = (), trickle_bytes_per_s: float = 2.0,
          swap: dict[str, tuple[int, str]] | None = None) -> Iterator[FlakyServer]:
    """A flaky HTTP server for the files of `folder` (see the module docstring), on a free port of 127.0.0.1."""
    state = FlakyServer("", Path(folder), drop_every_bytes, fail_first_n, ranges, fail_status, tuple(always_fail),
                        stall_s, head_status, tuple(html), tuple(trickle), trickle_bytes_per_s, dict(swap or {}))
    handler = type("Handler", (_FlakyHandler,), {"server_state": state})
    with _running(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        state.url = url
        yield state


@contextlib.contextmanager
def serve_static(folder: str | os.PathLike) -> Iterator[str]:
    """Python's own http.server.SimpleHTTPRequestHandler over `folder`; yields the base URL."""
    handler = functools.partial(_QuietStatic, directory=str(folder))
    with _running(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        yield url


class _QuietStatic(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@contextlib.contextmanager
def _running(server: ThreadingHTTPServer) -> Iterator[str]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
