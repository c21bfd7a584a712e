"""Read-ahead of the next shard: `prefetch` starts a handle whose next bytes a thread reads (bounded memory), and
`pipeline.data.io.remote.open_shard` hands it over to the reader that opens the same shard at the same byte."""

from __future__ import annotations

from typing import Optional

from pipeline.data.io.handles import ForwardReader, ReadOptions, shard_size
from pipeline.data.io.transports import open_transport, url_kind

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
    _PREFETCHED[url] = Prefetched(url, options, int(options.prefetch_mb * 1e6), offset=offset)


def take(url: str, offset: int) -> Optional["Prefetched"]:
    """The read-ahead of `url` when one was started at byte `offset` (it is handed over: taken from the held ones)."""
    ahead = _PREFETCHED.get(url)
    if ahead is not None and ahead.offset == offset:
        return _PREFETCHED.pop(url)
    return None


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
            self._inner = open_transport(self.url, options, self.offset)
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
