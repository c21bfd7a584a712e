"""What is retried and how: the retrying base of the HTTP and object-store readers (exact resume at the byte where a
connection broke) and `retrying` for single calls such as a stat (see `pipeline.data.io.remote`)."""

from __future__ import annotations

import http.client
import io
import ssl
import time
from typing import Optional

from pipeline.data.io.counters import count
from pipeline.data.io.handles import CHUNK, ForwardReader, Pace, ReadOptions
from pipeline.errors import first_line
from pipeline.exits import NetworkError, PermanentError


class Transient(OSError):
    """A failure worth retrying that is not an exception of its own (HTTP 5xx, a body cut short)."""


def _one_line(exc: BaseException) -> str:
    return first_line(exc, limit=0 if isinstance(exc, Transient) else 200, typed=not isinstance(exc, Transient))


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (PermanentError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(getattr(exc, "reason", None), ssl.SSLCertVerificationError):  # a bad certificate stays bad
        return False
    if isinstance(exc, (OSError, http.client.HTTPException)):
        return True
    return type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")  # raised through s3fs


class ShardReader(ForwardReader):
    """A shard read through a connection that may break: retries, exact resume, counters (module docstring).

    Subclasses connect (`_open_at`), read (`_raw_read`) and disconnect (`_close_raw`); this class keeps the
    position, decides what is retried and re-connects at the exact byte.
    """

    def __init__(self, url: str, options: ReadOptions, offset: int = 0):
        super().__init__()
        self.url, self.options = url, options
        self.size: Optional[int] = None
        self.tag = ""  # ETag or Last-Modified, to notice a shard that changes between connections
        self.content_type = ""  # what the server says it sends (for the line about a shard that is not a tar)
        self.pos = offset
        self._failures = 0  # failed attempts in a row
        self._slow = 0  # windows in a row under options.min_bytes_per_s (bytes arriving then do not reset _failures)
        self._pace = Pace(options.min_bytes_per_s, options.slow_window_s)
        self._connected = False
        self._connect(offset, resuming=False)

    # ---- what a transport provides --------------------------------------------------------------
    def _open_at(self, offset: int) -> int:
        """Start a body at `offset` (or earlier: return where it starts); set size/tag on the first call."""
        raise NotImplementedError

    def _raw_read(self, n: int) -> bytes:
        raise NotImplementedError

    def _close_raw(self) -> None:
        raise NotImplementedError

    # ---- file interface -------------------------------------------------------------------------
    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        data = self._read_some(n)
        if len(data) == n or not data:
            return data
        parts, got = [data], len(data)
        while got < n:
            more = self._read_some(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def seek(self, pos: int, whence: int = 0) -> int:
        target = {0: pos, 1: self.pos + pos, 2: (self.size or 0) + pos}[whence]
        if target < self.pos and not self.seekable():
            raise io.UnsupportedOperation(f"{self.url}: cannot seek back from byte {self.pos} to {target}")
        if target != self.pos and (target < self.pos or self._jump(target - self.pos)):
            self._close_raw()
            self._connect(target, resuming=False)
            self.pos = target
        while self.pos < target and self.read(min(CHUNK, target - self.pos)):
            pass
        return self.pos

    def _jump(self, distance: int) -> bool:
        """Whether a forward seek by `distance` re-connects rather than reads through."""
        return False

    def close(self) -> None:
        if not self.closed and self._connected:
            self._close_raw()
            self._connected = False
        super().close()

    # ---- retries --------------------------------------------------------------------------------
    def _read_some(self, n: int) -> bytes:
        """Up to n bytes (b"" only at the end), re-connecting at the exact byte after a transient failure."""
        while True:
            try:
                data = self._paced_read(n)
                if not data and n and self.size is not None and self.pos < self.size:
                    raise Transient(f"the connection ended at byte {self.pos} of {self.size}")
            except Exception as exc:  # noqa: BLE001 - _is_transient decides; the rest is raised as is
                self._recover(exc)
                continue
            if data:
                self.pos += len(data)
                if not self._slow:
                    self._failures = 0
            return data

    def _paced_read(self, n: int) -> bytes:
        """`_raw_read`, timed: a connection slower than options.min_bytes_per_s fails (its bytes are not taken)."""
        began = time.monotonic()
        data = self._raw_read(n)
        verdict = self._pace.add(len(data), time.monotonic() - began)
        if verdict is not None:
            self._slow = self._slow + 1 if verdict else 0
            if verdict:
                raise Transient(verdict)
        return data

    def _recover(self, exc: BaseException) -> None:
        """Count a failure, then re-connect at `pos` (raise if it is permanent or the retries are spent)."""
        self._close_raw()
        self._connected = False
        self._connect(self.pos, resuming=self.pos > 0, error=exc)

    def _connect(self, offset: int, resuming: bool, error: Optional[BaseException] = None) -> None:
        """Connect with retries; the body then continues at `offset` exactly."""
        while True:
            if error is not None:
                self._give_up_or_wait(error, offset)
            try:
                self._pace.restart()
                start = self._open_at(offset)
                self._connected = True
                self._discard(offset - start)
                break
            except Exception as exc:  # noqa: BLE001 - _give_up_or_wait raises what is not transient
                if self._connected:
                    self._close_raw()
                    self._connected = False
                error = exc
        if resuming:
            count("resumed")

    def _discard(self, count: int) -> None:
        """Read and drop `count` bytes of a body that started before the wanted offset (no Range support)."""
        while count > 0:
            data = self._paced_read(min(CHUNK, count))
            if not data:
                raise Transient(f"the connection ended {count} bytes before byte {self.pos}")
            count -= len(data)

    def _give_up_or_wait(self, error: BaseException, offset: int) -> None:
        if not _is_transient(error):
            count("failed")
            if isinstance(error, PermanentError):
                raise error
            raise PermanentError(f"{self.url}: {_one_line(error)}" + (f" (at byte {offset})" if offset else "")) \
                from error
        self._failures += 1
        if self._failures > self.options.retries:
            count("failed")
            raise NetworkError(f"network: {self.url}: gave up at byte {offset} after {self.options.retries} "
                               f"retries; last error: {_one_line(error)}") from error
        count("retries")
        time.sleep(self.options.backoff(self._failures))


def retrying(url: str, options: ReadOptions, call):
    """call(url, options) with the retry rules of a shard read (counted the same way)."""
    failures = 0
    while True:
        try:
            return call(url, options)
        except Exception as exc:  # noqa: BLE001 - permanent ones are raised at once
            if not _is_transient(exc):
                raise exc if isinstance(exc, PermanentError) else PermanentError(f"{url}: {_one_line(exc)}") from exc
            failures += 1
            if failures > options.retries:
                count("failed")
                raise NetworkError(f"network: {url}: gave up after {options.retries} retries; "
                                   f"last error: {_one_line(exc)}") from exc
            count("retries")
            time.sleep(options.backoff(failures))
