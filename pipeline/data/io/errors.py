"""The transports' errors (one line each, with the exit code a command ends with) and the check that a shard is
still the version its index saw."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pipeline.errors import raised_again_line
from pipeline.exits import EXIT_BAD_DATA, EXIT_REMOTE_DATA

if TYPE_CHECKING:
    from pipeline.data.io.handles import ReadOptions


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

    exit_code = EXIT_BAD_DATA  # a changed shard is bad data (65)


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

