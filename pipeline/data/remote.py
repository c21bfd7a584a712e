"""Open a shard wherever it lives: a local path or file://, http(s)://, object stores (s3://, gs://, ...
through fsspec) and `pipe:COMMAND` (webdataset's convention: the command's standard output).

What a handle from `open_shard` guarantees:

- **Exact bytes.** It delivers the shard's bytes in order, each once. A connection that breaks in the
  middle of a shard is resumed at the exact byte: HTTP asks for `Range: bytes=N-` and continues where
  the server answers 206; where it answers 200 (no Range support) the new body's first N bytes are read
  and discarded. Object stores re-open the object and seek to N (a ranged GET). A shard that changes
  size or ETag between two connections fails instead of being stitched together.
- **Retries, bounded.** Transient failures (connection refused or reset, timeouts, a body shorter than
  its Content-Length, HTTP 5xx, 408 and 429, a server slower than `min_bytes_per_s`) are retried up to
  `ReadOptions.retries` times in a row (the count restarts once bytes arrive again at speed), waiting
  `backoff_s * 2**k` (capped at `backoff_max_s`, +-20% jitter) before retry k+1; then `NetworkError`
  (exit 69 on the command line). Permanent ones (HTTP 4xx such as 404/403, a missing object, access
  denied, a malformed URL) fail at once: `PermanentError` (exit 2: the URL names nothing readable).
  Either way the message is one line: the URL, the byte offset and the last error. Nothing ever waits
  longer than `timeout_s` for a byte.
- **Never slower than asked** (curl's --speed-limit/--speed-time): a connection that delivers less than
  `min_bytes_per_s` over `slow_window_s` seconds of waiting for it (time spent in reads: a consumer that
  pauses is not the server's fault) fails like a timeout, and is retried and counted as one. A server
  that trickles 2 bytes a second thus ends in `NetworkError` after the retries, never in a hang.
- **The version the index saw.** `ReadOptions.pinned` holds the size and version (ETag or Last-Modified;
  local: size and mtime) each shard had when it was indexed; a shard that answers another at any open
  raises `ShardChanged` (exit 65): never a run that mixes two versions of its data.
- **Bounded memory.** Bytes are streamed in the caller's read sizes; no shard is held in memory.
- **Opened where asked.** `open_shard(url, options, offset)` delivers the shard from byte `offset` on (a
  sample's start, from the shard index): local files and cached copies seek; HTTP asks `Range: bytes=N-`
  on its first connection, and where the server ignores it (200) reads and discards the body's first N
  bytes; object stores open at N; a shard being copied into the cache (`cache_dir`) and `pipe:` output
  are read through from the start (the copy needs every byte; a pipe cannot skip).
- **Counted.** `net_counters()` gives this process's cumulative `retries` (failed attempts that were
  retried), `resumed` (connections re-established in the middle of a shard) and `failed` (shards given
  up after the last retry). The stream adds their per-batch deltas to the batches' fault counts.
- **pipe:** is not retried (a command's output cannot be resumed); a non-zero exit of the command
  before its output was read to the end is an `OSError` naming it.
- **Cache** (`cache_dir`, see `pipeline.data.shard_cache`): remote shards read to their end are kept
  locally and later opens read the copy (one per pinned version).
- **Stat without HEAD.** `stat_shard` asks HEAD; a server that refuses it (405, 501; 403 from S3 presigned
  GET URLs; 400) is asked for its first byte with a ranged GET instead, whose answer carries the same.

Handles offer read(n), tell(), seekable(), seek(pos), close(); `shard_size(handle)` gives the size in
bytes, or None when unknown (remote handles carry it as `size`; local ones are plain files, for speed).
seek() goes forward on every handle (a stream reads and discards; HTTP with Range support re-connects
for long jumps); only local and object-store handles seek backwards (`seekable()` says so).

Why HTTP is not read through fsspec's HTTP filesystem: it reads by Range blocks only (a server without
Range support is read whole into memory or not at all), its retries sit inside aiohttp where they can
be neither bounded per shard nor counted, and it needs an event loop thread per worker. A plain
`urllib` reader gives exact Range resume with a 200 fallback, one timeout per socket operation, and
counters. Object stores go through fsspec (s3fs for S3, installed with `pip install pipeline[s3]`;
gcsfs for gs://), which already speaks their APIs; our retry layer sits on top of theirs.

S3-compatible endpoints (MinIO, Ceph, moto): set `ReadOptions.endpoint_url` (config: data.endpoint_url)
or the standard AWS_ENDPOINT_URL environment variable; credentials come from the usual AWS variables or
files. Other fsspec arguments go in `ReadOptions.storage_options`.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional

from pipeline.data.handles import CHUNK, ForwardReader, Pace, ReadOptions, open_local
from pipeline.errors import first_line, raised_again_line

SEEK_BY_RANGE = 4 << 20
"""A forward HTTP seek longer than this re-connects with a Range request instead of reading through."""
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses that are retried (any other 5xx is too); other 4xx fail at once."""
HEAD_REFUSED = frozenset({400, 403, 405, 501})
"""Answers to HEAD after which `stat_shard` asks a ranged GET instead (S3 presigned GET URLs: 403)."""
from pipeline.exits import EXIT_BAD_DATA, EXIT_REMOTE_DATA  # noqa: E402 - a changed shard is bad data (65)

USER_AGENT = "pipeline-shard-reader/1"

_COUNTERS = {"retries": 0, "resumed": 0, "failed": 0}


def net_counters() -> dict[str, int]:
    """This process's cumulative network counters: retries, resumed, failed (see the module docstring)."""
    return dict(_COUNTERS)


class RemoteError(OSError):
    """The reader's own errors: one line, kept when torch's DataLoader raises one again in the main process."""

    def __init__(self, message: str) -> None:
        super().__init__(raised_again_line(message))


class PermanentError(RemoteError):
    """A failure that retrying cannot fix (HTTP 404/403, missing object, ...); the message is one line.
    On the command line it is bad input (exit 2), as a missing local file is: the URL names nothing readable."""

    exit_code = 2


class NetworkError(RemoteError):
    """A remote read given up after `ReadOptions.retries` retries (the server fails, stalls, is too slow or
    cannot be reached); exit 69 on the command line."""

    exit_code = EXIT_REMOTE_DATA


class ShardChanged(PermanentError):
    """A shard that answers another size or version than the index recorded (`ReadOptions.pinned`): reading on
    would mix two versions of the data in one run (exit 65)."""

    exit_code = EXIT_BAD_DATA


class _HeadRefused(Exception):
    """HEAD answered with one of HEAD_REFUSED: `stat_shard` asks a ranged GET instead."""


class _Transient(OSError):
    """A failure worth retrying that is not an exception of its own (HTTP 5xx, a body cut short)."""


def url_kind(url: str) -> str:
    """local, pipe, http or fsspec (any other `scheme://`)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith("file:") or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", url):
        return "local"
    return "http" if url.startswith(("http://", "https://")) else "fsspec"


def local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def _one_line(exc: BaseException) -> str:
    return first_line(exc, limit=0 if isinstance(exc, _Transient) else 200, typed=not isinstance(exc, _Transient))


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
                    raise _Transient(f"the connection ended at byte {self.pos} of {self.size}")
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
                raise _Transient(verdict)
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
            _COUNTERS["resumed"] += 1

    def _discard(self, count: int) -> None:
        """Read and drop `count` bytes of a body that started before the wanted offset (no Range support)."""
        while count > 0:
            data = self._paced_read(min(CHUNK, count))
            if not data:
                raise _Transient(f"the connection ended {count} bytes before byte {self.pos}")
            count -= len(data)

    def _give_up_or_wait(self, error: BaseException, offset: int) -> None:
        if not _is_transient(error):
            _COUNTERS["failed"] += 1
            if isinstance(error, PermanentError):
                raise error
            raise PermanentError(f"{self.url}: {_one_line(error)}" + (f" (at byte {offset})" if offset else "")) \
                from error
        self._failures += 1
        if self._failures > self.options.retries:
            _COUNTERS["failed"] += 1
            raise NetworkError(f"network: {self.url}: gave up at byte {offset} after {self.options.retries} "
                               f"retries; last error: {_one_line(error)}") from error
        _COUNTERS["retries"] += 1
        time.sleep(self.options.backoff(self._failures))


class HttpReader(ShardReader):
    """http(s):// through urllib (redirects, proxies from the environment, TLS)."""

    _response: Optional[http.client.HTTPResponse] = None
    _ranges = False  # the server said it takes Range requests (Accept-Ranges: bytes, or a 206 answer)

    def _open_at(self, offset: int) -> int:
        headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
        response = _http_request(self.url, headers, self.options.timeout_s, offset)
        start, size = _body_start(response, offset)
        self.content_type = response.headers.get("Content-Type", "")
        self._check_same_shard(size, _http_tag(response))
        self._response = response
        self._ranges = self._ranges or response.status == 206 or response.headers.get("Accept-Ranges") == "bytes"
        return start

    def _check_same_shard(self, size: Optional[int], tag: str) -> None:
        if self.size is None and not self.tag:
            check_pinned(self.url, self.options, size, tag, self.content_type)
            self.size, self.tag = size, tag
        elif (size is not None and self.size is not None and size != self.size) or (tag and tag != self.tag):
            raise ShardChanged(f"{self.url}: the shard changed while being read (size {self.size} -> {size}, "
                                 f"tag {self.tag!r} -> {tag!r}); restart the run")

    def _raw_read(self, n: int) -> bytes:
        return self._response.read1(n)  # one recv at most: a trickling server cannot hold a read for ever

    def _close_raw(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _jump(self, distance: int) -> bool:
        return self._ranges and distance > SEEK_BY_RANGE


def _http_request(url: str, headers: dict, timeout: float, offset: int,
                  method: str = "GET") -> http.client.HTTPResponse:
    """The response to one request; HTTP errors as PermanentError or _Transient with 'URL: 404 Not Found'."""
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        what = f"{exc.code} {exc.reason}"
        if method == "HEAD" and exc.code in HEAD_REFUSED:
            raise _HeadRefused(what) from None
        if exc.code in RETRY_STATUS or exc.code >= 500:
            raise _Transient(what) from None
        raise PermanentError(f"{url}: {what}" + (f" (at byte {offset})" if offset else "")) from None
    except ValueError as exc:  # unknown URL type, bad port
        raise PermanentError(f"{url}: {exc}") from None


def _body_start(response: http.client.HTTPResponse, offset: int) -> tuple[int, Optional[int]]:
    """(offset where the body starts, shard size or None)."""
    if response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match is None:
            raise _Transient("a 206 answer without a usable Content-Range")
        start, total = int(match.group(1)), match.group(2)
        if start > offset:
            raise PermanentError(f"{response.url}: asked for byte {offset}, the server sent from {start}")
        return start, None if total == "*" else int(total)
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def _http_tag(response: http.client.HTTPResponse) -> str:
    """The version an HTTP answer carries: its ETag (a weak one's W/ dropped), else its Last-Modified."""
    tag = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
    return tag[2:] if tag.startswith("W/") else tag


def check_pinned(url: str, options: ReadOptions, size: Optional[int], version: str, content_type: str = "") -> None:
    """Raise ShardChanged when the shard at `url` answers another size or version than `options.pinned` has for it
    (what the index recorded); unknown values on either side are not compared."""
    pinned = options.pinned.get(url)
    if not pinned:
        return
    old_size, old_version = pinned
    other_size = bool(old_size and size is not None and size != old_size)
    other_version = bool(old_version and version and version != old_version)
    if other_size or other_version:
        sent = f"; it now sends {content_type}" if content_type else ""
        raise ShardChanged(f"shard {url} changed since it was indexed (size {old_size} -> {size}, version "
                           f"{old_version!r} -> {version!r}{sent}); a run must not mix two versions of its data: "
                           f"restore the shard, or start a new run (run.name), which indexes it again")


class FsspecReader(ShardReader):
    """Object stores (s3://, gs://, az://, ...) through fsspec; re-opened and seeked after a failure."""

    _file = None

    def _open_at(self, offset: int) -> int:
        if self._file is None or self._file.closed:
            fs, path = filesystem(self.url, self.options)
            self._file = fs.open(path, "rb", block_size=CHUNK, cache_type="readahead")
        size = getattr(self._file, "size", None)
        if self.size is not None and size is not None and size != self.size:
            raise ShardChanged(f"{self.url}: the shard changed size while being read ({self.size} -> {size})")
        if self.size is None:
            check_pinned(self.url, self.options, size, _fsspec_tag(getattr(self._file, "details", None) or {}))
        self.size = self.size if size is None else size
        self._file.seek(offset)
        return offset

    def _raw_read(self, n: int) -> bytes:
        return self._file.read(n)

    def _close_raw(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self._file = None

    def seekable(self) -> bool:
        return True

    def _jump(self, distance: int) -> bool:
        return distance > CHUNK


def filesystem(url: str, options: ReadOptions):
    """(fsspec filesystem, path) for an object-store URL, with the endpoint override for s3://."""
    import fsspec

    kwargs = dict(options.storage_options)
    if url.startswith(("s3://", "s3a://")):
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs.setdefault("endpoint_url", endpoint)
        kwargs["config_kwargs"] = {"connect_timeout": options.timeout_s, "read_timeout": options.timeout_s,
                                   **kwargs.get("config_kwargs", {})}
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        hint = " (pip install 'pipeline[s3]')" if url.startswith(("s3://", "s3a://")) else ""
        raise PermanentError(f"{url}: {first_line(exc)}" + hint) from None
    except ValueError as exc:
        raise PermanentError(f"{url}: {exc}") from None


class PipeReader(ForwardReader):
    """`pipe:COMMAND`: the command's standard output through webdataset's gopen, forward only, not retried."""

    size = None

    def __init__(self, url: str, options: ReadOptions):
        from webdataset.gopen import gopen

        super().__init__()
        self.url, self.options, self.pos = url, options, 0
        self._pipe = gopen(url, "rb", bufsize=CHUNK)
        self._pipe.timeout = options.timeout_s

    def read(self, n: int = -1) -> bytes:
        data = self._pipe.stream.read(n)  # not Pipe.read: its exit check races the end of the output
        self.pos += len(data)
        if n is None or n < 0 or len(data) < n:
            self._check_exit()
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.pos + pos
        if target < self.pos or whence == 2:
            raise io.UnsupportedOperation(f"{self.url}: a pipe only reads forward")
        while self.pos < target and self.read(min(CHUNK, target - self.pos)):
            pass
        return self.pos

    def _check_exit(self) -> None:
        """At the end of the output: a non-zero exit means the output is incomplete."""
        try:
            status = self._pipe.proc.wait(self.options.timeout_s)
        except subprocess.TimeoutExpired:
            self._pipe.proc.kill()
            raise OSError(f"{self.url}: the command closed its output but did not exit within "
                          f"{self.options.timeout_s:g} s (killed)") from None
        if status not in (0, 141):
            raise OSError(f"{self.url}: the command exited with status {status} after {self.pos} bytes")

    def close(self) -> None:
        """Closing early is fine: the command gets SIGPIPE; its exit status then says nothing."""
        if not self.closed:
            self._pipe.stream.close()
            try:
                self._pipe.proc.wait(self.options.timeout_s)
            except subprocess.TimeoutExpired:
                self._pipe.proc.kill()
                self._pipe.proc.wait()
        super().close()


def shard_size(handle) -> Optional[int]:
    """The size of the shard behind a handle from `open_shard`, or None where it is not known (streams)."""
    size = getattr(handle, "size", None)
    if size is None and isinstance(handle, io.BufferedReader) and isinstance(handle.raw, io.FileIO):
        return os.fstat(handle.fileno()).st_size
    return size


def open_shard(url: str, options: Optional[ReadOptions] = None, offset: int = 0):
    """A readable handle on the shard at `url`, at byte `offset` (see the module docstring for what it guarantees
    and how each kind of URL gets there).

    Raises OSError with one line naming the URL when it cannot be opened (after the retries for
    transient failures). Local files raise the usual FileNotFoundError/PermissionError. A shard
    `prefetch` started in this process at the same offset is handed over, with the bytes it has read ahead.
    """
    ahead = _PREFETCHED.get(url)
    if ahead is not None and ahead.offset == offset:
        return _PREFETCHED.pop(url)
    return _open(url, options or ReadOptions(), offset)


def _open(url: str, options: ReadOptions, offset: int = 0):
    """`open_shard` without the read-ahead: remote transports connect at `offset`, other handles seek to it."""
    kind = url_kind(url)
    if kind == "local":
        handle = _open_local(url, options)
    elif kind == "pipe":
        handle = PipeReader(url, options)
    elif options.cache_dir:
        from pipeline.data import shard_cache

        handle = shard_cache.open_cached(url, options, _remote)
    else:
        return _remote(url, options, offset)
    try:
        if offset:
            handle.seek(offset)
    except BaseException:
        handle.close()
        raise
    return handle


def _open_local(url: str, options: ReadOptions):
    handle = open_local(local_path(url))
    if url in options.pinned:
        info = os.fstat(handle.fileno())
        try:
            check_pinned(url, options, info.st_size, _local_version(info))
        except ShardChanged:
            handle.close()
            raise
    return handle


def _remote(url: str, options: ReadOptions, offset: int = 0) -> ShardReader:
    return (HttpReader if url_kind(url) == "http" else FsspecReader)(url, options, offset)


def stat_shard(url: str, options: Optional[ReadOptions] = None) -> tuple[Optional[int], str]:
    """(size in bytes or None, a version string: mtime_ns, ETag or Last-Modified) for index staleness checks.

    pipe: URLs cannot be asked: (None, "").
    """
    options = options or ReadOptions()
    kind = url_kind(url)
    if kind == "local":
        info = os.stat(local_path(url))
        return info.st_size, _local_version(info)
    if kind == "pipe":
        return None, ""
    return _retrying(url, options, _stat_http if kind == "http" else _stat_fsspec)


def _local_version(info: os.stat_result) -> str:
    return f"size={info.st_size} mtime_ns={info.st_mtime_ns}"


def _stat_http(url: str, options: ReadOptions) -> tuple[Optional[int], str]:
    headers = {"User-Agent": USER_AGENT}
    try:
        response = _http_request(url, headers, options.timeout_s, 0, method="HEAD")
        _, size = _body_start(response, 0)
    except _HeadRefused:  # the first byte's answer carries the size (Content-Range) and the version too
        response = _http_request(url, {**headers, "Range": "bytes=0-0"}, options.timeout_s, 0)
        _, size = _body_start(response, 0)
    with response:
        return size, _http_tag(response)


def _stat_fsspec(url: str, options: ReadOptions) -> tuple[Optional[int], str]:
    fs, path = filesystem(url, options)
    info = fs.info(path)
    return info.get("size"), _fsspec_tag(info)


def _fsspec_tag(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return str(tag).strip('"') if tag else ""


def _retrying(url: str, options: ReadOptions, call):
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
                _COUNTERS["failed"] += 1
                raise NetworkError(f"network: {url}: gave up after {options.retries} retries; "
                                   f"last error: {_one_line(exc)}") from exc
            _COUNTERS["retries"] += 1
            time.sleep(options.backoff(failures))


# ---- read-ahead of the next shard ------------------------------------------------------------------------------
_PREFETCHED: dict[str, "Prefetched"] = {}
MAX_PREFETCHED = 2
"""Shards read ahead per process at most, by default (a worker needs one per lane: `prefetch(keep=...)`)."""


def prefetch(url: str, options: Optional[ReadOptions] = None, keep: int = MAX_PREFETCHED, offset: int = 0) -> None:
    """Start opening remote shard `url` at byte `offset` and reading its next `options.prefetch_mb` MB in a thread,
    so the next `open_shard(url, offset=offset)` in this process continues from there instead of waiting for the
    network. Local files are not prefetched (the page cache does that); nor is a shard already being prefetched.
    `keep`: read-aheads held at most (a stream reading several shards at once prefetches one per shard)."""
    options = options or ReadOptions()
    if url_kind(url) == "local" or not options.prefetch_mb or url in _PREFETCHED:
        return
    while len(_PREFETCHED) >= keep:  # never handed over (the iteration stopped): let it go
        _PREFETCHED.pop(next(iter(_PREFETCHED))).close()
    _PREFETCHED[url] = Prefetched(url, options, int(options.prefetch_mb * 1e6), offset)


class Prefetched(ForwardReader):
    """A shard handle, at byte `offset`, whose next `limit` bytes a thread reads ahead (bounded memory); reads are
    served from them, then from the same connection. Errors of the thread surface when its bytes run out
    (the connection's own retries have run by then). Forward seeks only, like the other streams."""

    CHUNK = 1 << 20

    def __init__(self, url: str, options: ReadOptions, limit: int, offset: int = 0):
        import threading

        super().__init__()
        self.url, self.limit, self.offset, self.pos = url, limit, offset, offset
        self._buffer, self._start = bytearray(), 0  # unread bytes are _buffer[_start:]
        self._filled = 0  # bytes of the shard the thread has read
        self._inner = None
        self._error: Optional[BaseException] = None
        self._done = False
        self._stop = threading.Event()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._fill, args=(options,), daemon=True,
                                        name=f"prefetch {url.rsplit('/', 1)[-1]}")
        self._thread.start()

    @property
    def size(self) -> Optional[int]:
        self._wait(lambda: self._inner is not None)
        return shard_size(self._inner) if self._inner is not None else None

    @property
    def content_type(self) -> str:
        self._wait(lambda: self._inner is not None)
        return getattr(self._inner, "content_type", "")

    def _fill(self, options: ReadOptions) -> None:
        try:
            self._inner = _open(self.url, options, self.offset)
            with self._ready:
                self._ready.notify_all()
            while not self._stop.is_set() and self._filled < self.limit:
                data = self._inner.read(min(self.CHUNK, self.limit - self._filled))
                with self._ready:
                    if not data:
                        break
                    self._buffer += data
                    self._filled += len(data)
                    self._ready.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it in its own thread
            self._error = exc
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()
                abandoned = self.closed
            if abandoned and self._inner is not None:  # closed while reading ahead: the thread lets go of it
                self._inner.close()

    def _wait(self, ready) -> None:
        with self._ready:
            self._ready.wait_for(lambda: ready() or self._done)

    def _unread(self) -> int:
        return len(self._buffer) - self._start

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """n bytes (fewer only at the end of the shard), across the end of the bytes read ahead: the tar reader
        takes a short block for a cut shard (a read-ahead shorter than the shard used to end one early)."""
        if n is None or n < 0:
            n = 1 << 62
        parts = []
        while n > 0 and (data := self._read_some(n)):
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def _read_some(self, n: int) -> bytes:
        self._wait(lambda: self._unread() > 0)
        with self._ready:
            if self._unread() > 0:
                data = bytes(self._buffer[self._start:self._start + n])
                self._start += len(data)
                if self._start > self.CHUNK:  # drop what was read: memory stays within the limit
                    del self._buffer[:self._start]
                    self._start = 0
                self.pos += len(data)
                return data
        if self._error is not None:
            raise self._error
        self._thread.join()  # the thread is done: the connection is the reader's now
        if self._inner is None:
            return b""
        data = self._inner.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.pos + pos
        if target < self.pos:
            raise OSError(f"{self.url}: a read-ahead shard only seeks forward ({self.pos} -> {target})")
        self._wait(lambda: self.pos + self._unread() >= target)
        with self._ready:
            skip = min(target - self.pos, self._unread())
            self._start += skip
            self.pos += skip
        if self.pos < target:  # past the bytes read ahead: the connection seeks (a Range jump where it can)
            if self._error is not None:
                raise self._error
            self._stop.set()
            self._thread.join()
            with self._ready:
                self._buffer, self._start = bytearray(), 0
            if self._inner is not None:
                self._inner.seek(target)
            self.pos = target
        return self.pos

    def close(self) -> None:
        """Never waits for the network: a thread still reading closes the connection when its read returns."""
        if self.closed:
            return
        self._stop.set()
        with self._ready:
            super().close()
            running = not self._done
        if not running and self._inner is not None:
            self._inner.close()
