"""Placeholder until the transport layer lands: local files only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ReadOptions:
    retries: int = 5


def stat_shard(url: str, options: Optional[ReadOptions] = None) -> tuple[Optional[int], str]:
    if url.startswith("pipe:"):
        return None, ""
    info = os.stat(url)
    return info.st_size, f"size={info.st_size} mtime_ns={info.st_mtime_ns}"
