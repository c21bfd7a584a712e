"""A shard's size and version without reading it (for the index's staleness checks)."""

from __future__ import annotations

import os
from typing import Optional

from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.http import stat_http
from pipeline.data.io.object_store import stat_fsspec
from pipeline.data.io.retry import retrying
from pipeline.data.io.transports import local_path, local_version, url_kind


def stat_shard(url: str, options: Optional[ReadOptions] = None) -> tuple[Optional[int], str]:
    """(size in bytes or None, a version string: mtime_ns, ETag or Last-Modified) for index staleness checks.

    pipe: URLs cannot be asked: (None, "").
    """
    options = options or ReadOptions()
    kind = url_kind(url)
    if kind == "local":
        info = os.stat(local_path(url))
        return info.st_size, local_version(info)
    if kind == "pipe":
        return None, ""
    return retrying(url, options, stat_http if kind == "http" else stat_fsspec)
