"""What every shard handle is built on: the read options, the forward-only handle base, local files.

Below both `remote` (the transports) and `shard_cache` (which wraps them), so neither imports the other.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

CHUNK = 1 << 20
"""Bytes per read when discarding and copying; also the object stores' read-ahead block."""


@dataclass
class ReadOptions:
    """How shards are read (picklable: it travels to the loader's worker processes)."""

    retries: int = 5
    """Retries after a transient failure, in a row (the count restarts once bytes arrive again); 0: none."""
    timeout_s: float = 60.0
    """Seconds to wait for a connection or for the next bytes before the attempt counts as failed."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubled for each further one, capped at backoff_max_s."""
    backoff_max_s: float = 10.0
    """Longest wait between two attempts."""
    cache_dir: str = ""
    """Folder keeping remote shards read to their end (empty: no cache); see pipeline.data.shard_cache."""
    cache_max_gb: float = 50.0
    """Size cap of cache_dir in GB (10^9 bytes); least recently used shards are removed beyond it."""
    endpoint_url: str = ""
    """S3-compatible endpoint for s3:// URLs (e.g. http://127.0.0.1:9000); empty: AWS_ENDPOINT_URL or AWS."""
    prefetch_mb: float = 32.0
    """The next remote shard of a worker's slot is opened and read ahead, up to this many MB, while the current one
    is read (0: off); see `prefetch`."""
    storage_options: dict = field(default_factory=dict)
    """Extra keyword arguments for the fsspec filesystem of object-store URLs (e.g. {"anon": true})."""

    def __post_init__(self) -> None:
        if self.retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0 or self.cache_max_gb <= 0:
            raise ValueError(f"ReadOptions needs retries >= 0, timeout_s > 0, backoff_s >= 0 and cache_max_gb > 0; "
                             f"got {self.retries}, {self.timeout_s}, {self.backoff_s}, {self.cache_max_gb}")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)


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
