"""Object stores (s3://, gs://, az://, ...) through fsspec, with our retry layer on top of theirs (see
`pipeline.data.io.remote`)."""

from __future__ import annotations

import os
from typing import Optional

from pipeline.data.io.handles import CHUNK, ReadOptions
from pipeline.data.io.pinned import check_pinned
from pipeline.data.io.retry import ShardReader
from pipeline.errors import first_line
from pipeline.exits import PermanentError, ShardChanged


class FsspecReader(ShardReader):
    """Object stores (s3://, gs://, az://, ...) through fsspec; re-opened and seeked after a failure."""

    _file = None

    def _open_at(self, offset: int) -> int:
        if self._file is None or self._file.closed:
            fs, path = filesystem(self.url, self.options)
            self._file = fs.open(path, "rb", block_size=CHUNK, cache_type="readahead")
        size = getattr(self._file, "size", None)
        if self.size is not None and size is not None and size != self.size:
            raise ShardChanged(f"{self.url}: the shard changed size while being read ({self.size} -> {size})")
        if self.size is None:
            check_pinned(self.url, self.options, size, fsspec_tag(getattr(self._file, "details", None) or {}))
        self.size = self.size if size is None else size
        self._file.seek(offset)
        return offset

    def _raw_read(self, n: int) -> bytes:
        return self._file.read(n)

    def _close_raw(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
            self._file = None

    def seekable(self) -> bool:
        return True

    def _jump(self, distance: int) -> bool:
        return distance > CHUNK


def filesystem(url: str, options: ReadOptions):
    """(fsspec filesystem, path) for an object-store URL, with the endpoint override for s3://."""
    import fsspec

    kwargs = dict(options.storage_options)
    if url.startswith(("s3://", "s3a://")):
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs.setdefault("endpoint_url", endpoint)
        kwargs["config_kwargs"] = {"connect_timeout": options.timeout_s, "read_timeout": options.timeout_s,
                                   **kwargs.get("config_kwargs", {})}
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        hint = " (pip install 'pipeline[s3]')" if url.startswith(("s3://", "s3a://")) else ""
        raise PermanentError(f"{url}: {first_line(exc)}" + hint) from None
    except ValueError as exc:
        raise PermanentError(f"{url}: {exc}") from None


def stat_fsspec(url: str, options: ReadOptions) -> tuple[Optional[int], str]:
    fs, path = filesystem(url, options)
    info = fs.info(path)
    return info.get("size"), fsspec_tag(info)


def fsspec_tag(info: dict) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return str(tag).strip('"') if tag else ""
