"""What every shard handle is built on: the read options, the forward-only handle base, local files.

Below both `remote` (the transports) and `shard_cache` (which wraps them), so neither imports the other.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, field, fields
from typing import Optional

from pipeline.config.schema import ReadConfig

CHUNK = 1 << 20
"""Bytes per read when discarding and copying; also the object stores' read-ahead block."""


@dataclass
class ReadOptions(ReadConfig):
    """How shards are read (picklable: it travels to the loader's worker processes): the `data:` section's read
    fields (`ReadConfig`, defined there once) and the reader's own below."""

    backoff_s: float = 0.5
    """Wait before the first retry; doubled for each further one, capped at backoff_max_s."""
    backoff_max_s: float = 10.0
    """Longest wait between two attempts."""
    storage_options: dict = field(default_factory=dict)
    """Extra keyword arguments for the fsspec filesystem of object-store URLs (e.g. {"anon": true})."""
    pinned: dict = field(default_factory=dict)
    """URL -> (size in bytes or 0, version or '') each shard had when indexed; a shard that answers another size or
    version at an open raises `ShardChanged` (see `pipeline.data.io.remote`). Empty: nothing compared."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0 or self.cache_max_gb <= 0:
            raise ValueError(f"ReadOptions needs retries >= 0, timeout_s > 0, backoff_s >= 0 and cache_max_gb > 0; "
                             f"got {self.retries}, {self.timeout_s}, {self.backoff_s}, {self.cache_max_gb}")
        if self.min_bytes_per_s < 0 or self.slow_window_s <= 0 or self.max_sample_mb < 0:
            raise ValueError(f"ReadOptions needs min_bytes_per_s >= 0, slow_window_s > 0 and max_sample_mb >= 0; got "
                             f"{self.min_bytes_per_s}, {self.slow_window_s}, {self.max_sample_mb}")

    @classmethod
    def from_config(cls, data: ReadConfig, **more: object) -> "ReadOptions":
        """The options a `data:` config section sets (its `ReadConfig` fields), plus `more` (e.g. `pinned`)."""
        return cls(**{f.name: getattr(data, f.name) for f in fields(ReadConfig)}, **more)

    @property
    def max_sample_bytes(self) -> int:
        """`max_sample_mb` in bytes (0: no cap)."""
        return int(self.max_sample_mb * 1e6)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)


class Pace:
    """A connection's delivery rate against a minimum, as curl's --speed-limit/--speed-time.

    Only the time spent waiting in reads counts (a reader that pauses does not make the server slow). Once
    `window_s` seconds of waiting have gathered, `add` gives the verdict on them and starts a new window.
    """

    def __init__(self, min_bytes_per_s: float, window_s: float):
        self.min_bytes_per_s, self.window_s = min_bytes_per_s, window_s
        self.restart()

    def restart(self) -> None:
        """A new connection: a new window."""
        self.waited, self.received = 0.0, 0

    def add(self, received: int, waited: float) -> Optional[str]:
        """None while the window is open; at its end '' (fast enough) or the line saying how slow it was."""
        if not self.min_bytes_per_s:
            return None
        self.waited += waited
        self.received += received
        if self.waited < self.window_s:
            return None
        rate, waited = self.received / self.waited, self.waited
        self.restart()
        if rate >= self.min_bytes_per_s:
            return ""
        return (f"slower than data.min_bytes_per_s={self.min_bytes_per_s:g}: {rate:.1f} bytes/s over "
                f"{waited:.1f} s")


class ForwardReader(io.RawIOBase):
    """What every shard handle here shares: readable, `pos` as the position, readinto through `read`."""

    pos = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def open_local(path: str) -> io.BufferedReader:
    """A local shard: the plain buffered file (its C methods are called per tar member; a subclass of
    it, to carry `size`, measured ~20% slower per call). `shard_size` gives its size."""
    return open(path, "rb", buffering=CHUNK)


def shard_size(handle) -> Optional[int]:
    """The size of the shard behind a handle from `open_shard`, or None where it is not known (streams)."""
    size = getattr(handle, "size", None)
    if size is None and isinstance(handle, io.BufferedReader) and isinstance(handle.raw, io.FileIO):
        return os.fstat(handle.fileno()).st_size
    return size
