"""A lean reader of WebDataset tar shards: samples [start, stop) of one shard, as webdataset groups them.

Python's tarfile module (which webdataset uses) spends ~60-90 us per member parsing headers; shards
written by `webdataset.TarWriter` carry a PAX header per member, so that is ~0.2 ms per sample (an
image and its class), a sixth of decoding a 224 px JPEG. This reader parses only the fields a shard
needs (name, size, type; PAX `path`, GNU long names), and seeks past the data of the samples before
`start` instead of reading them. Grouping follows webdataset: members with the same name up to the
first dot of the file name form one sample, keyed by the rest of the name (lower-cased).

Shards are opened with `pipeline.data.io.remote.open_shard`, so a URL may be local, http(s)://, an object
store or `pipe:COMMAND`. Where the handle knows its size, data is skipped by seeking (local files: a
seek in the buffer or the file; HTTP: read through, or a Range request for long jumps); where it does
not (pipes, gzip streams), it is read and discarded, which also finds a cut. `.tar.gz`/`.tgz` shards
are read through a gzip stream (forward only).

Either way a shard cut short raises `tarfile.ReadError("unexpected end of data")`; a network failure
that outlasts the retries raises the reader's one-line OSError.

Where a sample starts: the byte offset of its first member's header (of the PAX or long-name header
before it, if any) is what `placed_samples` yields with each sample and the shard index records. Given
that offset (`at`), `tar_samples` opens the shard there (a seek; over HTTP a `Range: bytes=N-` request,
see `pipeline.data.io.remote`) instead of walking the members before `start`. Without it (0) the walk from
the shard's start stays; so it does for `.tar.gz` shards (offsets are not seekable in a gzip stream).

What a shard may not do to the reader:

- **Not be a tar.** The first header's checksum is checked: an HTML page served with 200, garbage, or a
  .tar.gz that is not gzip raises `NotATar` (a `tarfile.ReadError`) with the content type the server
  gave and the first bytes; a later header that does not parse is a ReadError too.
- **Hold a bomb.** A sample whose files add up to more than `ReadOptions.max_sample_mb` is never held:
  the files over the cap are skipped unread (seeked past, or read and discarded in 1 MiB pieces through
  a gzip stream), and the sample is yielded without them, marked `BAD` ("oversize"). So a 1.5 MB
  .tar.gz holding a 1.5 GB member costs the time to inflate it, not the memory. PAX and GNU long-name
  headers over 1 MiB are a ReadError.
- **Repeat a file name in a sample.** Which copy is right cannot be known: the sample is marked `BAD`
  ("undecodable") and the rest of the shard is read as usual (webdataset raises, losing the rest).

A sample marked `BAD` still counts as one sample (the index and the stream agree on the count), and
`pipeline.data.samples.faults` skips and counts it.
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from contextlib import closing, contextmanager
from typing import BinaryIO, Iterator, Optional

from pipeline.data.io.handles import CHUNK, ReadOptions, shard_size
from pipeline.data.io.remote import open_shard

BLOCK = 512
MAX_NAME_HEADER = 1 << 20
"""Largest PAX extended header or GNU long name read (they only name the next member)."""
BAD = "__bad__"
"""Key of a sample's (reason, detail) when the reader dropped its files (oversize, repeated file name)."""
HEAD_SHOWN = 48
"""Bytes of a shard that is not a tar shown in the error line."""


class NotATar(tarfile.ReadError):
    """The shard does not start with a tar header (an HTML page, garbage); the message names what it is."""


def _not_a_tar(kind: str, head: bytes, content_type: str) -> NotATar:
    sent = f" (content type {content_type})" if content_type else ""
    return NotATar(f"not a {kind} file{sent}: it starts with {head[:HEAD_SHOWN]!r}")


def _checksum_ok(header: bytes) -> bool:
    """Whether a header's checksum field matches its bytes (as tarfile: unsigned or signed sums)."""
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"x", 8)
    except ValueError:
        return False
    unsigned = 256 + sum(header[:148]) + sum(header[156:])
    high = sum(1 for b in header[:148] if b >= 128) + sum(1 for b in header[156:] if b >= 128)
    return stored in (unsigned, unsigned - 256 * high)
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips such members


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (sizes of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid tar header: {bytes(field)!r} is not a number") from None


def _pax_path(data: bytes) -> Optional[str]:
    """The `path` record of a PAX extended header, if any ("<length> <key>=<value>\\n" records)."""
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            break
        length = int(data[position:space])
        record = data[space + 1:position + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        position += length
    return None


def _members(handle: BinaryIO, content_type: str = "") -> Iterator[tuple[str, int, int, int]]:
    """(name, size, offset of the data, offset of the member's first header) of each regular file, from the
    handle's position on (a member's first header is its PAX or long-name header when it has one); the caller may
    read the data in between.

    A file cut short raises tarfile.ReadError("unexpected end of data"), as tarfile does; one that does not start
    with a tar header raises NotATar.
    """
    file_size = shard_size(handle)
    long_name: Optional[str] = None
    named_at = -1  # where the PAX/long-name header naming the next member starts (-1: none)
    first = True
    while True:
        header = handle.read(BLOCK)
        if not header or not header.strip(b"\0"):
            return
        if first and (len(header) < BLOCK or not _checksum_ok(header)):
            raise _not_a_tar("tar", header, content_type)
        first = False
        if len(header) < BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        size, kind = _number(header[124:136]), header[156:157]
        start = handle.tell()
        if file_size is not None and start + size > file_size:
            raise tarfile.ReadError("unexpected end of data")
        padded = size + (-size) % BLOCK
        if kind in (b"x", b"L"):  # PAX extended header / GNU long name: they name the next member
            if size > MAX_NAME_HEADER:
                raise tarfile.ReadError(f"a {'PAX' if kind == b'x' else 'long name'} header of {size} bytes "
                                        f"(at most {MAX_NAME_HEADER} are read)")
            data = _read_exactly(handle, padded)[:size]
            long_name = (_pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode("utf-8")) or long_name
            named_at = start - BLOCK if named_at < 0 else named_at
            continue
        if kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8") + "/" + name
            yield name, size, start, start - BLOCK if named_at < 0 else named_at
        long_name, named_at = None, -1
        if file_size is not None:  # (inline: this line runs per member; a cut was checked against the size)
            handle.seek(start + padded)
        else:
            _read_forward(handle, start + padded)


def _read_exactly(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _read_forward(handle: BinaryIO, position: int) -> None:
    """Read and discard up to `position` (a stream of unknown size), so that a cut is noticed here too."""
    while (gap := position - handle.tell()) > 0:
        if not handle.read(min(gap, CHUNK)):
            raise tarfile.ReadError("unexpected end of data")


class _Head:
    """A handle whose first bytes are kept, to say what a shard that is not a gzip stream starts with."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.head = handle, b""

    def read(self, n: int = -1) -> bytes:
        data = self.handle.read(n)
        if len(self.head) < HEAD_SHOWN:
            self.head += data[:HEAD_SHOWN - len(self.head)]
        return data


def gzipped(url: str) -> bool:
    """Whether the shard is read through a gzip stream (forward only: its offsets cannot be opened at)."""
    return url.endswith((".gz", ".tgz"))


@contextmanager
def _open(url: str, options: Optional[ReadOptions], at: int = 0) -> Iterator[tuple[BinaryIO, str]]:
    """(the shard's tar stream: the handle itself, at byte `at`, or a gzip stream over it for .tar.gz/.tgz, at its
    start; its content type)."""
    handle = open_shard(url, options, at)
    content_type = getattr(handle, "content_type", "")
    try:
        if gzipped(url):
            head = _Head(handle)
            with gzip.GzipFile(fileobj=head, mode="rb") as unzipped:
                try:
                    yield unzipped, content_type
                except gzip.BadGzipFile as exc:
                    if unzipped.tell() == 0:  # not even the first bytes inflated: no gzip stream at all
                        shown = head.head + handle.read(HEAD_SHOWN - len(head.head))  # (gzip read only 2)
                        raise _not_a_tar("gzip", shown, content_type) from exc
                    raise tarfile.ReadError(f"unexpected end of data ({exc})") from exc
                except (EOFError, zlib.error) as exc:  # a cut or corrupt gzip stream
                    raise tarfile.ReadError(f"unexpected end of data ({exc})") from exc
        else:
            yield handle, content_type
    finally:
        handle.close()


def _drop(sample: dict, reason: str, detail: str) -> None:
    """Let go of a sample's files and mark it BAD (it still counts as a sample)."""
    for ext in [k for k in sample if not k.startswith("__")]:
        del sample[ext]
    sample[BAD] = (reason, detail)


def tar_samples(url: str, start: int = 0, stop: Optional[int] = None, options: Optional[ReadOptions] = None,
                at: int = 0) -> Iterator[dict]:
    """Samples number `start` to `stop` (exclusive; None: the end) of the shard at `url` (see the module
    docstring for the kinds of URL); `options`: how remote shards are read (retries, timeouts, cache) and the
    cap on a sample's size; `at`: the byte offset where sample `start` begins, when known (see `placed_samples`)."""
    with closing(placed_samples(url, start, stop, options, at)) as placed:
        for _, sample in placed:
            yield sample


def placed_samples(url: str, start: int = 0, stop: Optional[int] = None, options: Optional[ReadOptions] = None,
                   at: int = 0) -> Iterator[tuple[int, dict]]:
    """(byte offset where the sample begins, sample) for samples `start` to `stop` of the shard at `url`.

    `at` > 0: sample `start` begins at byte `at` (as this function gave it, recorded by the shard index): the shard
    is opened there and nothing before it is read. 0: the members before `start` are walked (seeked past where the
    handle can). Ignored for `.tar.gz` shards (a gzip stream is not seekable by the inflated offset).
    """
    at = 0 if gzipped(url) or not start else at
    index, key = (start - 1 if at else -1), None
    sample: Optional[dict] = None
    placed = 0  # byte offset of the current sample
    cap = (options or ReadOptions()).max_sample_bytes
    held = 0  # bytes of the current sample's files
    with _open(url, options, at) as (handle, content_type):
        for name, size, _offset, header_at in _members(handle, content_type):
            match = _KEY_EXT.match(name)
            if match is None or _META.match(name):
                continue
            base, ext = match.group(1), match.group(2).lower()
            if base != key:
                if sample is not None:
                    yield placed, sample
                    sample = None
                key, index = base, index + 1
                if stop is not None and index >= stop:
                    return
                if index >= start:
                    sample, held, placed = {"__key__": base, "__url__": url}, 0, header_at
            if sample is not None and BAD not in sample:  # (a dropped sample's further files are skipped unread)
                if ext in sample:
                    _drop(sample, "undecodable", f"the file name {name} appears twice in the sample")
                    continue
                held += size
                if cap and held > cap:
                    _drop(sample, "oversize", f"its files hold {held / 1e6:.1f} MB or more, over data.max_sample_mb="
                                              f"{cap / 1e6:g}; skipped unread")
                    continue
                data = sample[ext] = handle.read(size)
                if len(data) < size:
                    raise tarfile.ReadError("unexpected end of data")
        if sample is not None:
            yield placed, sample
