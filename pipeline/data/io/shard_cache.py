"""A local cache of remote shards (`ReadOptions.cache_dir`, capped at `cache_max_gb`).

What it guarantees:

- **Never a half file.** A shard is copied to a temporary name in the cache folder while it is read,
  and renamed to its final name (atomic, same folder) only once it was read to its very end; a read
  that stops earlier leaves nothing behind. (Closing a handle within 64 KiB of the end reads that tail
  first, so a read of a shard's last samples completes its copy: tar padding follows the last sample.)
- **Later opens read the copy**, locally, and mark it used (its mtime is set to now).
- **Least recently used out.** After each new copy, the oldest-used copies are removed until the
  folder holds at most `cache_max_gb` (the new copy always stays, even alone over the cap).
- **Several processes at once.** Each writer has its own temporary file; the rename makes the last
  complete copy win (the same bytes). A copy another process removes between lookup and open falls
  back to the network; a temporary file left by a killed process is removed after a day.
- **One copy per version.** A shard pinned to the version its index saw (`ReadOptions.pinned`) is cached
  under a name that includes that version, so a shard that changed and was indexed again is fetched
  again, never read from the old copy (which leaves with the least recently used). Unpinned shards: a
  copy is trusted while it exists; delete the folder to start over.

pipe: URLs and local files are never cached.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable

from pipeline.data.io.handles import CHUNK, ForwardReader, ReadOptions, open_local

TAIL = 64 << 10
"""A handle closed this close to its shard's end reads the rest, so the copy completes."""
STALE_TEMP_S = 24 * 3600
TEMP_PREFIX = ".tmp-"


def cache_path(url: str, cache_dir: str, version: str = "") -> Path:
    """The copy's path: a hash of the URL and the pinned version (unique) and its file name (readable)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    key = f"{url}\n{version}" if version else url
    return Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{name}"


def open_cached(url: str, options: ReadOptions, open_remote: Callable[[str, ReadOptions], object]):
    """The local copy of `url` if there is one, else the remote handle, copied into the cache as it is read."""
    pinned = options.pinned.get(url)
    path = cache_path(url, options.cache_dir, f"{pinned[0]} {pinned[1]}" if pinned else "")
    try:
        handle = open_local(str(path))
    except FileNotFoundError:
        return CachingReader(open_remote(url, options), path, int(options.cache_max_gb * 1e9))
    try:
        os.utime(path)  # used now (least recently used = oldest mtime)
    except FileNotFoundError:  # removed by another process since; the open handle still reads it
        pass
    return handle


class CachingReader(ForwardReader):
    """A remote handle whose bytes are also written to a temporary file, renamed once the shard is complete."""

    def __init__(self, reader, path: Path, max_bytes: int):
        super().__init__()
        self.reader, self.path, self.max_bytes = reader, path, max_bytes
        self.url, self.size = reader.url, reader.size
        self.content_type = getattr(reader, "content_type", "")
        self._eof = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._temp = path.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}"
        self._out = open(self._temp, "wb")

    def tell(self) -> int:
        return self.reader.tell()

    def read(self, n: int = -1) -> bytes:
        data = self.reader.read(n)
        if n is None or n < 0 or len(data) < n:
            self._eof = True
        if self._out is not None:
            try:
                self._out.write(data)
            except OSError:  # disk full or the like: this shard is read without a copy
                self._abandon()
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        """Forward only, reading through (the skipped bytes belong in the copy too)."""
        target = pos if whence == 0 else self.tell() + pos
        if target < self.tell() or whence == 2:
            raise io.UnsupportedOperation(f"{self.url}: a shard being cached is read forward only")
        while self.tell() < target and self.read(min(CHUNK, target - self.tell())):
            pass
        return self.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._out is not None:
                self._finish()
        finally:
            self.reader.close()
            super().close()

    def _finish(self) -> None:
        """Read a short tail, then rename the copy if the shard was read to its end, else drop it."""
        try:
            if self.size is not None and 0 < self.size - self.tell() <= TAIL:
                self.read(self.size - self.tell())
            elif self.size is None and not self._eof:
                self.read(TAIL)
            self._eof = self._eof or (self.size is not None and self.tell() >= self.size)
        except OSError:  # the network failed in the tail: no copy this time
            self._eof = False
        if self._out is None or not self._eof:
            self._abandon()
            return
        self._out.close()
        self._out = None
        os.replace(self._temp, self.path)
        evict(self.path.parent, self.max_bytes, keep=self.path)

    def _abandon(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


def evict(folder: Path, max_bytes: int, keep: Path) -> None:
    """Remove least recently used copies (oldest mtime first, never `keep`) until `folder` holds <= max_bytes."""
    entries, now = [], time.time()
    for entry in os.scandir(folder):
        try:
            info = entry.stat()
        except FileNotFoundError:  # removed by another process
            continue
        if entry.name.startswith(TEMP_PREFIX):
            if now - info.st_mtime > STALE_TEMP_S:
                _remove(entry.path)
            continue
        entries.append((info.st_mtime, info.st_size, entry.path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path != str(keep):
            _remove(path)
            total -= size


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
