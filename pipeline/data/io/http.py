"""http(s):// shards through urllib: Range requests to resume and seek, a 200 answer read through where Range is not
supported, HEAD (or a ranged GET where HEAD is refused) to stat (see `pipeline.data.io.remote`)."""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from typing import Optional

from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.pinned import check_pinned
from pipeline.data.io.retry import ShardReader, Transient
from pipeline.exits import PermanentError, ShardChanged

SEEK_BY_RANGE = 4 << 20
"""A forward HTTP seek longer than this re-connects with a Range request instead of reading through."""
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP statuses that are retried (any other 5xx is too); other 4xx fail at once."""
HEAD_REFUSED = frozenset({400, 403, 405, 501})
"""Answers to HEAD after which `stat_shard` asks a ranged GET instead (S3 presigned GET URLs: 403)."""
USER_AGENT = "pipeline-shard-reader/1"


class HeadRefused(Exception):
    """HEAD answered with one of HEAD_REFUSED: `stat_shard` asks a ranged GET instead."""


class HttpReader(ShardReader):
    """http(s):// through urllib (redirects, proxies from the environment, TLS)."""

    _response: Optional[http.client.HTTPResponse] = None
    _ranges = False  # the server said it takes Range requests (Accept-Ranges: bytes, or a 206 answer)

    def _open_at(self, offset: int) -> int:
        headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={offset}-"} if offset else {})}
        response = http_request(self.url, headers, self.options.timeout_s, offset)
        start, size = body_start(response, offset)
        self.content_type = response.headers.get("Content-Type", "")
        self._check_same_shard(size, http_tag(response))
        self._response = response
        self._ranges = self._ranges or response.status == 206 or response.headers.get("Accept-Ranges") == "bytes"
        return start

    def _check_same_shard(self, size: Optional[int], tag: str) -> None:
        if self.size is None and not self.tag:
            check_pinned(self.url, self.options, size, tag, self.content_type)
            self.size, self.tag = size, tag
        elif (size is not None and self.size is not None and size != self.size) or (tag and tag != self.tag):
            raise ShardChanged(f"{self.url}: the shard changed while being read (size {self.size} -> {size}, "
                                 f"tag {self.tag!r} -> {tag!r}); restart the run")

    def _raw_read(self, n: int) -> bytes:
        return self._response.read1(n)  # one recv at most: a trickling server cannot hold a read for ever

    def _close_raw(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    def _jump(self, distance: int) -> bool:
        return self._ranges and distance > SEEK_BY_RANGE


def http_request(url: str, headers: dict, timeout: float, offset: int,
                  method: str = "GET") -> http.client.HTTPResponse:
    """The response to one request; HTTP errors as PermanentError or Transient with 'URL: 404 Not Found'."""
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        what = f"{exc.code} {exc.reason}"
        if method == "HEAD" and exc.code in HEAD_REFUSED:
            raise HeadRefused(what) from None
        if exc.code in RETRY_STATUS or exc.code >= 500:
            raise Transient(what) from None
        raise PermanentError(f"{url}: {what}" + (f" (at byte {offset})" if offset else "")) from None
    except ValueError as exc:  # unknown URL type, bad port
        raise PermanentError(f"{url}: {exc}") from None


def body_start(response: http.client.HTTPResponse, offset: int) -> tuple[int, Optional[int]]:
    """(offset where the body starts, shard size or None)."""
    if response.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match is None:
            raise Transient("a 206 answer without a usable Content-Range")
        start, total = int(match.group(1)), match.group(2)
        if start > offset:
            raise PermanentError(f"{response.url}: asked for byte {offset}, the server sent from {start}")
        return start, None if total == "*" else int(total)
    length = response.headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def http_tag(response: http.client.HTTPResponse) -> str:
    """The version an HTTP answer carries: its ETag (a weak one's W/ dropped), else its Last-Modified."""
    tag = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
    return tag[2:] if tag.startswith("W/") else tag


def stat_http(url: str, options: ReadOptions) -> tuple[Optional[int], str]:
    headers = {"User-Agent": USER_AGENT}
    try:
        response = http_request(url, headers, options.timeout_s, 0, method="HEAD")
        _, size = body_start(response, 0)
    except HeadRefused:  # the first byte's answer carries the size (Content-Range) and the version too
        response = http_request(url, {**headers, "Range": "bytes=0-0"}, options.timeout_s, 0)
        _, size = body_start(response, 0)
    with response:
        return size, http_tag(response)
