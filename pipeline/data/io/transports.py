"""Which transport opens a URL (local file, pipe, HTTP, object store; remote ones through the cache when there is
one), and at what byte: `open_transport`. `pipeline.data.io.remote.open_shard` is what callers use."""

from __future__ import annotations

import os
import re

from pipeline.data.io.handles import ReadOptions, open_local
from pipeline.data.io.http import HttpReader
from pipeline.data.io.object_store import FsspecReader
from pipeline.data.io.pinned import check_pinned
from pipeline.data.io.pipe import PipeReader
from pipeline.data.io.retry import ShardReader
from pipeline.exits import ShardChanged


def url_kind(url: str) -> str:
    """local, pipe, http or fsspec (any other `scheme://`)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith("file:") or not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", url):
        return "local"
    return "http" if url.startswith(("http://", "https://")) else "fsspec"


def local_path(url: str) -> str:
    return re.sub(r"^file://?", "/", url) if url.startswith("file:") else url


def open_transport(url: str, options: ReadOptions, offset: int = 0):
    """A shard opened by its transport (`open_shard` without the read-ahead): remote transports connect at `offset`,
    other handles seek to it."""
    kind = url_kind(url)
    if kind == "local":
        handle = _open_local(url, options)
    elif kind == "pipe":
        handle = PipeReader(url, options)
    elif options.cache_dir:
        from pipeline.data.io import shard_cache

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
            check_pinned(url, options, info.st_size, local_version(info))
        except ShardChanged:
            handle.close()
            raise
    return handle


def _remote(url: str, options: ReadOptions, offset: int = 0) -> ShardReader:
    return (HttpReader if url_kind(url) == "http" else FsspecReader)(url, options, offset)


def local_version(info: os.stat_result) -> str:
    return f"size={info.st_size} mtime_ns={info.st_mtime_ns}"
