"""`pipe:COMMAND` shards (webdataset's convention): the command's standard output, forward only, not retried."""

from __future__ import annotations

import io
import subprocess

from pipeline.data.io.handles import CHUNK, ForwardReader, ReadOptions


class PipeReader(ForwardReader):
    """`pipe:COMMAND`: the command's standard output through webdataset's gopen, forward only, not retried."""

    size = None

    def __init__(self, url: str, options: ReadOptions):
        from webdataset.gopen import gopen

        super().__init__()
        self.url, self.options, self.pos = url, options, 0
        self._pipe = gopen(url, "rb", bufsize=CHUNK)
        self._pipe.timeout = options.timeout_s

    def read(self, n: int = -1) -> bytes:
        data = self._pipe.stream.read(n)  # not Pipe.read: its exit check races the end of the output
        self.pos += len(data)
        if n is None or n < 0 or len(data) < n:
            self._check_exit()
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.pos + pos
        if target < self.pos or whence == 2:
            raise io.UnsupportedOperation(f"{self.url}: a pipe only reads forward")
        while self.pos < target and self.read(min(CHUNK, target - self.pos)):
            pass
        return self.pos

    def _check_exit(self) -> None:
        """At the end of the output: a non-zero exit means the output is incomplete."""
        try:
            status = self._pipe.proc.wait(self.options.timeout_s)
        except subprocess.TimeoutExpired:
            self._pipe.proc.kill()
            raise OSError(f"{self.url}: the command closed its output but did not exit within "
                          f"{self.options.timeout_s:g} s (killed)") from None
        if status not in (0, 141):
            raise OSError(f"{self.url}: the command exited with status {status} after {self.pos} bytes")

    def close(self) -> None:
        """Closing early is fine: the command gets SIGPIPE; its exit status then says nothing."""
        if not self.closed:
            self._pipe.stream.close()
            try:
                self._pipe.proc.wait(self.options.timeout_s)
            except subprocess.TimeoutExpired:
                self._pipe.proc.kill()
                self._pipe.proc.wait()
        super().close()
