"""The check that a shard is still the version its index saw. The transports' errors (`RemoteError`,
`PermanentError`, `NetworkError`, `ShardChanged`) are defined with their exit codes in `pipeline.exits`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pipeline.exits import ShardChanged

if TYPE_CHECKING:
    from pipeline.data.io.handles import ReadOptions


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

