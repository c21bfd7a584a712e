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
- **Cache** (`cache_dir`, see `pipeline.data.io.shard_cache`): remote shards read to their end are kept
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

from typing import Optional

from pipeline.data.io import readahead
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.transports import open_transport


def open_shard(url: str, options: Optional[ReadOptions] = None, offset: int = 0):
    """A readable handle on the shard at `url`, at byte `offset` (see the module docstring for what it guarantees
    and how each kind of URL gets there).

    Raises OSError with one line naming the URL when it cannot be opened (after the retries for
    transient failures). Local files raise the usual FileNotFoundError/PermissionError. A shard
    `prefetch` started in this process at the same offset is handed over, with the bytes it has read ahead.
    """
    ahead = readahead.take(url, offset)
    return ahead if ahead is not None else open_transport(url, options or ReadOptions(), offset)
