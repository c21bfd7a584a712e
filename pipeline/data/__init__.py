"""Data: digits export, shard writing, manifest, transforms, and the resumable shard stream.

The package by concept: `io` (opening shard bytes anywhere; the cache; tar), `dataset` (what the shards are:
manifest, specs, index, keys, the resolver), `samples` (checking, decoding, augmenting a sample), `plan` (which
slices each slot reads in an epoch), `stream` (the IterableDataset; `balance`, `workers` beside it), `loader`
(SplitLoader, build_stream, build_loader) and `writer` (shards, sources, digits, subsets, stratify).

Importing the package (or one of its modules) is cheap: the loader's modules (the stream and its workers, decoding
and augmentation with torchvision) are imported when a loader is built or one of their names is asked for, so that
a command that only reads a manifest or checks a data folder refuses bad input before torch and torchvision load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.data.dataset.manifest import Manifest

if TYPE_CHECKING:
    from pipeline.data.io.handles import ReadOptions
    from pipeline.data.loader import SplitLoader, build_loader, build_stream
    from pipeline.data.stream import ShardStream

_LAZY = {"ReadOptions": "pipeline.data.io.handles", "ShardStream": "pipeline.data.stream",
         "build_transform": "pipeline.data.samples.transforms", "read_options": "pipeline.data.dataset.resolve",
         "SplitLoader": "pipeline.data.loader", "build_loader": "pipeline.data.loader",
         "build_stream": "pipeline.data.loader"}
"""Names the package gives from its modules, imported on first use."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Manifest", "ReadOptions", "ShardStream", "SplitLoader", "build_loader", "build_stream",
           "build_transform", "read_options"]
