"""Stand-in sample codecs for tests of what a stream reads, without decoding images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image


class KeyCodec:
    """Batch items are the samples' `shard/key`: what a layout read, without decoding anything."""

    def decode(self, image: Image.Image, data: bytes, key: str, seed: Optional[int]) -> None:
        return None

    def sample(self, source, seed: Optional[int]) -> str:
        return f"{Path(source.url).name}/{source.key}"

    def batch(self, items: list) -> list:
        return items
