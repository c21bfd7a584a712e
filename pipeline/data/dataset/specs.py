"""Shard specs: what `data.train`, `data.val` and `data.test` may name, expanded to one ordered list of shards.

A spec is a string or a list of strings; each string is, after brace expansion (webdataset's
convention: `train-{000000..000146}.tar`, `{a,b}.tar`, also inside URLs and `pipe:` commands):

- a URL: `http(s)://`, `s3://`, `gs://` (or any scheme fsspec knows), `pipe:COMMAND` (the shard is the
  command's standard output); kept as given, in the order given;
- a local shard file (`.tar`, `.tar.gz`, `.tgz`; `file://` is stripped); it must exist;
- a glob (`shards/train-*.tar`): the matching shard files, sorted; it must match at least one;
- a local folder: one of ours (holding `manifest.json`: the shards of the split being asked for, with
  the counts the manifest records) or any folder of WebDataset shards (its shard files, sorted; not
  recursive).

Local shards are returned as absolute paths. A shard named twice is an error (it would be read twice
per epoch); so is a spec that names nothing. Every error is one line naming the config key.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand

from pipeline.data.dataset.manifest import MANIFEST_NAME, ShardInfo

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
GLOB_CHARS = "*?["


class SpecError(ValueError):
    """A shard spec that names nothing usable; the message is one line naming the key."""


def is_url(text: str) -> bool:
    """A remote shard (anything with a scheme but file://) or a `pipe:` command."""
    return text.startswith("pipe:") or ("://" in text and not text.startswith("file://"))


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIXES)


@dataclass
class Expanded:
    """A spec's shards in order; `own` maps a shard of one of our folders to its sample count (no index needed)."""

    urls: list[str] = field(default_factory=list)
    own: dict[str, ShardInfo] = field(default_factory=dict)
    own_folders: list[str] = field(default_factory=list)
    """Our shard folders the spec named (their manifests give classes and counts)."""


def as_list(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else [str(s) for s in spec]


def expand(spec: str | Sequence[str] | None, key: str, split: str) -> Expanded:
    """The shards `spec` names, for the config key `key` (e.g. data.train) and manifest split `split`."""
    items = as_list(spec)
    if not items:
        raise SpecError(f"{key} is empty; give shard files, a folder, a pattern or URLs")
    out = Expanded()
    for item in items:
        if not item.strip():
            raise SpecError(f"{key} has an empty entry; give shard files, a folder, a pattern or URLs")
        texts = list(braceexpand(item))
        _check_pattern(texts, key, item)
        for text in texts:
            _add(out, text, key, split, item)
    seen: set[str] = set()
    for url in out.urls:
        if url in seen:
            raise SpecError(f"{key} names the shard '{url}' more than once; each shard is read once per epoch")
        seen.add(url)
    return out


def _check_pattern(texts: list[str], key: str, item: str) -> None:
    """A brace pattern over local files names only files that exist (else: how many are missing, the first)."""
    local = [t[len("file://"):] if t.startswith("file://") else t for t in texts
             if not is_url(t) and not any(c in t for c in GLOB_CHARS)]
    missing = [t for t in local if not os.path.exists(os.path.expanduser(t))]
    if len(texts) > 1 and missing:
        raise SpecError(f"{key}: {len(missing)} of the {len(texts)} shards '{item}' names do not exist "
                        f"(first: {missing[0]})")


def _add(out: Expanded, text: str, key: str, split: str, item: str) -> None:
    if is_url(text):
        out.urls.append(text)
        return
    text = text[len("file://"):] if text.startswith("file://") else text
    path = Path(os.path.expanduser(text))
    if any(c in text for c in GLOB_CHARS):
        matches = sorted(m for m in glob.glob(str(path)) if is_shard_name(m) and os.path.isfile(m))
        if not matches:
            raise SpecError(f"{key}: the pattern '{text}' matches no shard file ({', '.join(SHARD_SUFFIXES)})")
        out.urls.extend(os.path.abspath(m) for m in matches)
    elif path.is_dir():
        _add_folder(out, path, key, split)
    elif path.is_file():
        out.urls.append(str(path.resolve()))
    else:
        origin = f" (from '{item}')" if text != item else ""
        raise SpecError(f"{key}: '{text}'{origin} does not exist; give shard files, a folder, a pattern or URLs")


def _add_folder(out: Expanded, path: Path, key: str, split: str) -> None:
    if (path / MANIFEST_NAME).is_file():
        from pipeline.data.dataset.manifest import Manifest

        manifest = Manifest.read(path, offsets=True)
        if split not in manifest.splits:
            raise SpecError(f"{key}: the shard folder '{path}' has no '{split}' split (it has "
                            f"{', '.join(manifest.splits)})")
        for shard in manifest.split(split).shards:
            url = str((path / shard.name).resolve())
            out.urls.append(url)
            out.own[url] = shard
        out.own_folders.append(str(path.resolve()))
        return
    shards = sorted(p for p in path.iterdir() if p.is_file() and is_shard_name(p.name))
    if not shards:
        inside = sorted(p.name for p in path.iterdir())[:5]
        raise SpecError(f"{key}: the folder '{path}' holds no shard files ({', '.join(SHARD_SUFFIXES)}); it holds "
                        f"{', '.join(inside) or 'nothing'}{' ...' if len(inside) == 5 else ''}")
    out.urls.extend(str(p.resolve()) for p in shards)


def describe(spec: str | Sequence[str] | None) -> str:
    """The spec as one short text (for messages and the manifest's `source`)."""
    items = as_list(spec)
    return items[0] if len(items) == 1 else f"[{', '.join(items[:3])}{', ...' if len(items) > 3 else ''}]"


def beside(url: str, name: str) -> str | None:
    """The URL or path of a file `name` in the same folder as shard `url` (None for pipe: commands)."""
    if url.startswith("pipe:"):
        return None
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


SPLIT_WORDS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "dev"),
               "test": ("test", "testing")}
"""Words in a shard's file name that say which split it belongs to (`train-000001.tar`, `cifar_val_3.tar`)."""


def named_splits(urls: Sequence[str]) -> dict[str, list[str]]:
    """Shard file names by the split their name says they belong to; names that say none are left out."""
    found: dict[str, list[str]] = {split: [] for split in SPLIT_WORDS}  # train, val, test: in that order
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        words = set(re.split(r"[^a-z]+", name.lower()))
        for split, names in SPLIT_WORDS.items():
            if words & set(names):
                found[split].append(name)
    return {split: names for split, names in found.items() if names}


def other_splits_line(split: str, urls: Sequence[str]) -> str | None:
    """A warning when shards given as `split` are named as another split's ('data.train' holding val-*.tar)."""
    others = {s: names for s, names in named_splits(urls).items() if s != split}
    if not others:
        return None
    count = len({n for names in others.values() for n in names})
    example = next(iter(others.values()))[0]
    return (f"data.{split}: {count} of its {len(urls)} shard(s) are named as {' / '.join(others)} shards "
            f"(e.g. {example}); if they are, {split} is mixed with them: give each split only its own shards "
            f"(e.g. data.{split}='DIR/{split}-*.tar')")


def several_splits_line(urls: Sequence[str]) -> str | None:
    """A warning when one set of shards carries the names of several splits (`pipeline data index DIR`)."""
    found = named_splits(urls)
    if len(found) < 2:
        return None
    counts = ", ".join(f"{split}: {len(names)}" for split, names in found.items())
    return (f"these shards are named as several splits ({counts}) and were indexed as one set; index or give "
            f"each split's shards on their own (data.train=... data.val=... data.test=...)")
