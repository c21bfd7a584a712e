"""The dataset a config names, as one `Manifest`: data.root's manifest.json, or shard specs and their indexes.

With `data.train` / `data.val` / `data.test` set (see `pipeline.data.dataset.specs`), each spec is expanded to
its shards, our own folders contribute their manifest's counts, any other shards are indexed (see
`pipeline.data.dataset.index`; read once, cached), and the class names come from, in this order:
`data.classes`, our folder's manifest, a `classes.txt` or `_info.json` beside the first training
shard, or the labels found while indexing (integers 0..max as '0'..'max', or the sorted names). The
resulting manifest names its shards by absolute path or URL, so the loader, the resume logic and the
evaluation treat these datasets exactly like ours. Without `data.test` the final evaluation uses
`data.val` (the caller says so).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config.schema import DataConfig, TaskConfig
from pipeline.data.dataset.index import (
    SpecIndex,
    cache_path,
    label_summary,
    load_or_build,
    shared_samples,
    target_stats,
    target_sums,
)
from pipeline.data.dataset.keys import SampleKeys
from pipeline.data.dataset.manifest import Manifest, ShardInfo, SplitInfo
from pipeline.data.dataset.specs import SpecError, beside, describe, expand, is_url
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.remote import open_shard

SPEC_SPLITS = ("train", "val", "test")
CLASS_FILES = ("classes.txt", "_info.json")


def uses_specs(data: DataConfig) -> bool:
    """Whether the config names its shards by spec (data.train ...) rather than by data.root."""
    return bool(data.train or data.val or data.test)


def sample_keys(data: DataConfig, classes: list[str] | tuple[str, ...] = (), task: Optional[TaskConfig] = None
                ) -> SampleKeys:
    return SampleKeys(image_key=data.image_key, label_key=data.label_key, classes=tuple(classes),
                      task=(task or TaskConfig()).type)


def read_options(data: DataConfig, shards: Sequence[ShardInfo] = ()) -> ReadOptions:
    """How shards are read (remote ones: retries, timeouts, pace, cache, endpoint; the sample cap); see
    `pipeline.data.io.remote`. `shards`: the indexed ones are pinned to the size and version their index saw."""
    return ReadOptions.from_config(data, pinned={s.name: (s.num_bytes, s.version) for s in shards if s.version})


def dataset_manifest(data: DataConfig, progress: bool = False, task: Optional[TaskConfig] = None) -> Manifest:
    """The manifest of the data a config names: its shard specs' (indexes cached), else data.root's."""
    return spec_manifest(data, progress, task=task) if uses_specs(data) else Manifest.read(data.root, offsets=True)


def spec_manifest(data: DataConfig, progress: bool = True, warn_shared: bool = False,
                  task: Optional[TaskConfig] = None) -> Manifest:
    """The manifest of the shards data.train / data.val / data.test name (indexing what needs it); `warn_shared`:
    a warning for val and test samples that are training samples too (see `warn_shared_samples`)."""
    if not data.train:
        raise SpecError("data.train is empty while data.val or data.test is set; give the training shards too")
    if not data.val:
        raise SpecError("data.val is not set; give the validation shards (a folder, shard files, a pattern or URLs)")
    manifest = specs_manifest({split: getattr(data, split) for split in SPEC_SPLITS if getattr(data, split)}, data,
                              progress, warn_shared=warn_shared, task=task)
    manifest.splits.setdefault("test", manifest.splits["val"])
    return manifest


def specs_manifest(specs: dict[str, list[str]], data: DataConfig, progress: bool = True, key_prefix: str = "data.",
                   rebuild: bool = False, warn_shared: bool = False, task: Optional[TaskConfig] = None) -> Manifest:
    """The manifest of named shard specs (split -> spec; the first split's shards are looked beside for class files).
    `task`: what a label is (task.type; regression: the classes are the outputs' names)."""
    task = task or TaskConfig()
    keys, options = sample_keys(data, task=task), read_options(data)
    parts: dict[str, tuple[list[str], dict[str, int], Optional[SpecIndex], list[Manifest]]] = {}
    for split, spec in specs.items():
        expanded = expand(spec, f"{key_prefix}{split}", split)
        foreign = [url for url in expanded.urls if url not in expanded.own]
        index = load_or_build(foreign, keys, options, data.index_dir, f"{key_prefix}{split}", progress,
                              rebuild) if foreign else None
        owns = [Manifest.read(folder) for folder in expanded.own_folders]
        parts[split] = (expanded.urls, expanded.own, index, owns)
    if warn_shared:
        warn_shared_samples({split: part[2] for split, part in parts.items()}, key_prefix)
    classes = _outputs(data, task, parts) if task.type == "regression" else _classes(data, parts, options)
    splits = {split: _split(f"{key_prefix}{split}", split, classes, keys, *part) for split, part in parts.items()}
    first = next(iter(specs.values()))
    return Manifest(classes=classes, splits=splits, source=describe(first), split_source="specs",
                    split_folders={split: describe(spec) for split, spec in specs.items()})


def training_shard_labels(data: DataConfig, task: Optional[TaskConfig] = None) -> list[Counter]:
    """Per indexed training shard (data.train's shards other than our own folders'), raw label -> samples, from the
    index cache `spec_manifest` has just made true; [] when the config names data.root (our writer shuffles)."""
    if not data.train:
        return []
    expanded = expand(data.train, "data.train", "train")
    foreign = [url for url in expanded.urls if url not in expanded.own]
    path = cache_path(data.index_dir, foreign, sample_keys(data, task=task)) if foreign else None
    if path is None or not path.is_file():
        return []
    return [entry.raw_labels() for entry in SpecIndex.read(path).shards]
def warn_shared_samples(indexes: dict[str, Optional[SpecIndex]], key_prefix: str = "data.",
                        names: dict[str, str] | None = None) -> None:
    """A warning line for each of val and test whose indexed samples include training samples (the same image
    bytes, by fingerprint): their metrics would measure memory. Nothing when the splits are disjoint. `names`: how
    the lines call the splits (default: the config keys, data.val ...)."""
    from pipeline.tracking.console import warn

    name = lambda split: (names or {}).get(split, f"{key_prefix}{split}")  # noqa: E731
    train = indexes.get("train")
    for split in ("val", "test"):
        other = indexes.get(split)
        shared = shared_samples(train, other, split) if train is not None and other is not None else None
        if shared is not None:
            warn(shared.line(name(split), name("train")))


def _split(what: str, split: str, classes: list[str], keys: SampleKeys, urls: list[str], own: dict[str, ShardInfo],
           index: Optional[SpecIndex], owns: list[Manifest]) -> SplitInfo:
    from pipeline.tracking.console import warn

    entries = {entry.url: entry for entry in index.shards} if index is not None else {}
    lost = _lost_samples(index) if index is not None else {}
    shards, counts = [], Counter()
    for manifest in owns:
        counts.update(manifest.split(split).class_counts)
    unusable, named = 0, SampleKeys(keys.image_key, keys.label_key, tuple(classes))
    regression = keys.task == "regression"
    for url in urls:
        if url in own:
            shards.append(ShardInfo(name=url, num_samples=own[url].num_samples, num_bytes=0, sha256="",
                                    offsets=own[url].offsets))
            continue
        entry = entries[url]
        if url in lost:
            got = f"could be read only up to sample {entry.num_samples} ({entry.error})" if entry.error else \
                "holds no samples"
            warn(f"{what}: shard {url} {got}; counted as {lost[url]} lost sample(s) ('truncated', against "
                 f"data.max_bad_fraction)")
        shards.append(ShardInfo(name=url, num_samples=entry.num_samples + lost.get(url, 0), num_bytes=entry.num_bytes,
                                sha256=entry.sha256, version=entry.version, offsets=entry.trusted_offsets()))
        unusable += entry.no_label
        if regression:
            unusable += 0 if len(entry.targets.get("sum", classes)) == len(classes) else entry.targets["count"]
        for raw, n in entry.raw_labels().items():
            label, reason, _ = named.index_of(raw, len(classes))
            if reason:
                unusable += n
            else:
                counts[classes[label]] += n
    if unusable:
        warn(f"{what}: {unusable} sample(s) have no usable label under data.label_key='{keys.label_key}' "
             f"for the {len(classes)} classes; they are skipped and counted (see data.max_bad_fraction)")
    total = sum(s.num_samples for s in shards)
    if regression:  # 'class' counts: labelled samples per output; the targets' statistics standardise them
        sums = [e.targets for e in entries.values()] + [target_sums(m.split(split).targets) for m in owns]
        stats = target_stats([t for t in sums if len(t.get("sum", ())) == len(classes)])
        return SplitInfo(num_samples=total, class_counts={name: stats.get("count", 0) for name in classes},
                         shards=shards, targets=stats)
    return SplitInfo(num_samples=total, class_counts={name: counts.get(name, 0) for name in classes}, shards=shards)


def _lost_samples(index: SpecIndex) -> dict[str, int]:
    """URL -> samples a shard lost: one that could not be read to its end (not a tar, cut short, ...) or holds no
    samples at all. How many a shard held cannot be known, so it counts as the split's mean shard (the mean of
    the shards read whole, rounded; 1 if there is none), less what was read, and at least 1 (the sample the error
    cut). The manifest then promises those samples, and the stream counts them as 'truncated' when they are not
    there: against data.max_bad_fraction, like any bad sample."""
    whole = [entry.num_samples for entry in index.shards if not entry.error and entry.num_samples]
    mean = max(1, round(sum(whole) / len(whole))) if whole else 1
    return {entry.url: max(1, mean - entry.num_samples) for entry in index.shards
            if entry.error or not entry.num_samples}


def _classes(data: DataConfig, parts: dict, options: ReadOptions) -> list[str]:
    """The class names, from the first source that has them (see the module docstring)."""
    if data.classes:
        return _check_names(_given_classes(list(data.classes)), "data.classes")
    owned = [m for _, _, _, owns in parts.values() for m in owns]
    if owned:
        return list(owned[0].classes)
    urls = next(iter(parts.values()))[0]
    found = _classes_beside(urls[0], options) if urls else None
    if found:
        return _check_names(found, f"the class file beside {urls[0]}")
    counts: Counter = Counter()
    members: Counter = Counter()
    for _, _, index, _ in parts.values():
        if index is not None:
            counts.update(index.label_counts())
            for entry in index.shards:
                members.update(entry.members)
    return _discovered(counts, members, data.label_key)


def _outputs(data: DataConfig, task: TaskConfig, parts: dict) -> list[str]:
    """task.type=regression: the outputs' names (data.classes, else the label field's name, numbered when there are
    several); their number is task.num_outputs, else the length of the training shards' labels."""
    _, _, index, owns = parts["train"] if "train" in parts else next(iter(parts.values()))
    lengths = Counter(len(e.targets["sum"]) for e in (index.shards if index is not None else ()) if e.targets)
    lengths.update(len(m.classes) for m in owns if m.task == "regression")  # our folders: their outputs
    found = lengths.most_common(1)[0][0] if lengths else 0
    count = task.num_outputs or (len(data.classes) if data.classes else found)
    if not count:
        raise SpecError(f"task.type=regression: no training sample has a number or a list of numbers under "
                        f"data.label_key='{data.label_key}'; set data.label_key=json.<field>")
    if data.classes and len(data.classes) != count:
        raise SpecError(f"data.classes names {len(data.classes)} output(s); task.type=regression has {count}")
    field_name = data.label_key.rsplit(".", 1)[-1]
    names = list(data.classes) or ([field_name] if count == 1 else [f"{field_name}{i}" for i in range(count)])
    return _check_names(names, "the regression outputs", minimum=1)


def _discovered(counts: Counter, members: Counter, label_key: str) -> list[str]:
    ints = sorted(k for k in counts if isinstance(k, int))
    names = sorted(k for k in counts if isinstance(k, str))
    if ints and names:
        raise SpecError(f"the labels under data.label_key='{label_key}' mix integers and names "
                        f"({label_summary(counts)}); give the class names in data.classes")
    if names:
        return names
    if not ints:
        seen = ", ".join(sorted(members)) or "none"
        raise SpecError(f"no sample has a label under data.label_key='{label_key}' (the samples' keys: {seen}); "
                        f"set data.label_key (cls, txt, json.<field>)")
    if ints[0] < 0:
        raise SpecError(f"labels under data.label_key='{label_key}' include {ints[0]}; class indices start at 0")
    return [str(i) for i in range(ints[-1] + 1)]


def _given_classes(values: list[str]) -> list[str]:
    """data.classes: the names, or one entry naming a text file of names (one per line)."""
    if len(values) == 1 and (values[0].endswith((".txt", ".json")) or os.path.sep in values[0]):
        path = Path(os.path.expanduser(values[0]))
        if not path.is_file():
            raise SpecError(f"data.classes names the file '{values[0]}', which does not exist")
        names = _parse_class_file(path.name, path.read_bytes())
        if names is None:
            raise SpecError(f"data.classes: '{values[0]}' holds no class names (one per line, or a JSON list)")
        return names
    return values


def _classes_beside(url: str, options: ReadOptions) -> Optional[list[str]]:
    for name in CLASS_FILES:
        where = beside(url, name)
        data = _read_small(where, options) if where else None
        names = _parse_class_file(name, data) if data is not None else None
        if names:
            return names
    return None


def _read_small(url: str, options: ReadOptions) -> Optional[bytes]:
    """A small file's bytes, or None when it is not there (or cannot be read: then it does not count)."""
    if not is_url(url):
        return Path(url).read_bytes() if os.path.isfile(url) else None
    try:
        with open_shard(url, options) as handle:
            return handle.read(1 << 20)
    except Exception:  # noqa: BLE001 - no class file beside the shards: the labels decide
        return None


def _parse_class_file(name: str, data: bytes) -> Optional[list[str]]:
    """Names from classes.txt (one per line) or _info.json ({"classes": [...]}, also class_names / names)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if name.endswith(".json"):
        try:
            info = json.loads(text)
        except ValueError:
            return None
        found = next((info[k] for k in ("classes", "class_names", "names") if isinstance(info, dict) and k in info),
                     info if isinstance(info, list) else None)
        if isinstance(found, dict):  # {"0": "cat", "1": "dog"}
            found = [found[k] for k in sorted(found, key=lambda k: int(k) if str(k).isdigit() else k)]
        return [str(n) for n in found] if isinstance(found, list) and found else None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names or None


def _check_names(names: list[str], where: str, minimum: int = 2) -> list[str]:
    for i, name in enumerate(names):
        if not name or name in names[:i]:
            raise SpecError(f"{where}: class name {name!r} at position {i} is empty or given twice")
    if len(names) < minimum:
        raise SpecError(f"{where} lists {len(names)} class(es); a classifier needs at least 2")
    return names
