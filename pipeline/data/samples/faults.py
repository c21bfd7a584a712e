"""Bad and odd samples: what is checked, what is fixed, what is skipped, and how skips are counted.

Every sample the stream reads is inspected once, as a pure function of its bytes and the manifest:

- fixed (counted as *converted*, still used): an image whose mode differs from the dataset's
  (`manifest.image_mode`, e.g. an RGBA or grayscale picture in an RGB set) is converted; an image
  whose size differs from the dataset's (`manifest.image_size`, when all written images shared one
  size) is resized by the transforms like every other image.
- skipped (counted by reason): `truncated` (the manifest promises the sample but its shard ends
  before it, or is not a tar at all), `undecodable` (no image, the image bytes do not decode, or a file
  name repeated in the sample), `no_label` (nothing under `data.label_key`, or nothing readable there; see
  `pipeline.data.dataset.keys`), `bad_label` (an index outside the classes, or a name not among them), `oversize`
  (the sample's files hold more than `data.max_sample_mb`, skipped unread by `pipeline.data.io.tar`; or the
  image has more pixels than PIL's decompression-bomb limit, see `pipeline.data.samples.images.open_image`).

Network counts (not skips; `pipeline.data.io.remote`): `net_retries` (failed attempts that were retried),
`net_resumed` (connections re-established in the middle of a shard), `net_failed` (shards given up;
their missing samples are also counted as `truncated`, with the network's error as the reason).

Counts travel with the batches (one small int64 tensor per batch, laid out as `FIELDS`), so they
cross DataLoader worker processes, survive persistent workers, and a rank's total is the sum over
the batches it consumed: exactly what a checkpoint at that step has seen.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch
from PIL import Image

from pipeline.data.dataset.keys import DEFAULT_KEYS, IMAGE_KEYS, SampleKeys  # noqa: F401 - IMAGE_KEYS re-exported
from pipeline.data.io.tar import BAD
from pipeline.data.samples.images import ImageTooLarge, open_image, to_mode
from pipeline.errors import short_error
from pipeline.exits import DataQualityError

SKIP_REASONS = ("truncated", "undecodable", "no_label", "bad_label", "oversize")
CONVERSIONS = ("mode", "size")
NETWORK_FIELDS = {"retries": "net_retries", "resumed": "net_resumed", "failed": "net_failed"}
"""`pipeline.data.io.counters.net_counters()` name -> counts field."""
FIELDS = ("seen", *SKIP_REASONS, *(f"converted_{c}" for c in CONVERSIONS), *NETWORK_FIELDS.values())
"""Layout of a counts tensor: samples inspected, skips per reason, conversions per kind, network events."""

MISSING = "__missing__"
"""Key of the stand-in the stream yields for a sample its shard does not deliver (truncated shard)."""
NO_POSITION = -1
"""The seed given when inspecting a sample whose position is not known yet (a fill-in for bad ones)."""
UNDRAWN = "__undrawn__"
"""Key under which a resampling stream hands over samples it cannot draw (no usable label), so
they are inspected and counted at the position that carries them."""


@dataclass
class SampleCheck:
    """The outcome of inspecting one raw sample: an image and label, or the reason it was skipped."""

    key: str
    url: str
    label: int = -1
    image: Optional[object] = None
    """The decoded image: a PIL image, or what the loader's decoder made of it."""
    reason: str = ""
    """Empty when the sample is usable, else one of SKIP_REASONS."""
    detail: str = ""
    """What was wrong, for the console warning."""
    converted: tuple[str, ...] = ()
    """The CONVERSIONS applied (mode, size)."""
    undrawn: tuple["SampleCheck", ...] = ()
    """Bad samples a resampling stream could not draw, counted along with this one (see UNDRAWN)."""
    data: bytes = b""
    """The image's bytes, and `ext` its key in the sample (so a loader can decode it again)."""
    ext: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason

    def where(self) -> str:
        shard = self.url.rsplit("/", 1)[-1]
        return f"sample '{self.key}' of shard {shard}"


def missing_sample(url: str, index: int, error: str) -> dict:
    """The stand-in for sample `index` of a shard that ended before it (see `MISSING`)."""
    return {"__key__": f"#{index}", "__url__": url, MISSING: error}


def parse_label(sample: dict, num_classes: int | None, keys: SampleKeys = DEFAULT_KEYS) -> tuple[int, str, str]:
    """(label, reason, detail): reason is '' for a usable label, else no_label or bad_label (see `keys`)."""
    return keys.label(sample, num_classes)


def inspect_sample(sample: dict, mode: str, num_classes: int | None = None, image_mode: str | None = None,
                   image_size: Sequence[int] | None = None,
                   decode: Optional[Callable[[Image.Image, bytes, str], object]] = None,
                   keys: SampleKeys = DEFAULT_KEYS) -> SampleCheck:
    """Check a raw sample and decode its image to `mode` (L or RGB); never raises.

    The label is checked first (cheap), so a sample with a bad label is not decoded. `decode(opened
    image, its bytes, its key)` replaces the decoding to a PIL image (the loader decodes its own way,
    see `pipeline.data.samples.decode`); whatever it returns becomes `check.image`, and raising means undecodable.
    """
    check = SampleCheck(key=str(sample.get("__key__", "?")), url=str(sample.get("__url__", "")))
    if UNDRAWN in sample:
        check.undrawn = tuple(inspect_sample(s, mode, num_classes, image_mode, image_size, keys=keys)
                              for s in sample[UNDRAWN])
    if MISSING in sample:
        check.reason, check.detail = "truncated", str(sample[MISSING])  # why the shard ended early
        return check
    if BAD in sample:  # the tar reader let go of its files: oversize, or a file name given twice
        check.reason, check.detail = sample[BAD]
        return check
    check.label, check.reason, check.detail = parse_label(sample, num_classes, keys)
    if check.reason:
        return check
    key = keys.image(sample)
    if key is None:
        check.reason, check.detail = "undecodable", f"no {keys.image_key or 'image'} in the sample"
        return check
    check.data, check.ext = sample[key], key
    try:
        image = open_image(io.BytesIO(sample[key]))
        source_mode, source_size = image.mode, image.size
        if decode is not None:
            check.image = decode(image, sample[key], key)
        else:
            image.draft(mode, image.size)  # cheap for JPEG, ignored otherwise
            check.image = to_mode(image, mode)  # decodes: broken data raises here
    except ImageTooLarge as exc:
        check.reason, check.detail = "oversize", str(exc)
        return check
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes; all mean "undecodable"
        check.reason, check.detail = "undecodable", short_error(exc)
        return check
    converted = []
    if image_mode and source_mode != image_mode:
        converted.append("mode")
        check.detail = f"{source_mode} image in a dataset of {image_mode} images"
    if image_size and tuple(source_size) != tuple(image_size):
        converted.append("size")
        size = f"{source_size[0]}x{source_size[1]} image where the dataset's are {image_size[0]}x{image_size[1]}"
        check.detail = f"{check.detail}; {size}" if check.detail else size
    check.converted = tuple(converted)
    return check


def empty_counts() -> torch.Tensor:
    return torch.zeros(len(FIELDS), dtype=torch.int64)


def count(counts: list[int] | torch.Tensor, check: SampleCheck) -> None:
    """Add one inspected sample (and any it carries, see UNDRAWN) to `counts` (laid out as FIELDS)."""
    for other in check.undrawn:
        count(counts, other)
    counts[0] += 1
    if check.reason:
        counts[FIELDS.index(check.reason)] += 1
    for kind in check.converted:
        counts[FIELDS.index(f"converted_{kind}")] += 1


class BadSampleCounts:
    """One rank's bad-sample counts (laid out as FIELDS) over the batches its loader delivered: the one place they add
    up. The workers count what they inspect (`count`) into each batch's counts, the main-process decoder adds the
    images it could not decode, and the loader adds each batch's counts here (`add`). At an epoch's end they are
    summed over ranks and zeroed (`pipeline.training.bad_data`); a checkpoint saves and restores them
    (`state_dict`, `load_state_dict`), so a resumed epoch keeps counting from where it stopped."""

    def __init__(self) -> None:
        self.total = empty_counts()

    def add(self, counts: torch.Tensor) -> None:
        self.total += counts

    def zero(self) -> None:
        self.total.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.total.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total = state["counts"].clone()


def as_dict(counts: torch.Tensor) -> dict[str, int]:
    return dict(zip(FIELDS, (int(v) for v in counts.tolist())))


def num_skipped(counts: torch.Tensor) -> int:
    return sum(as_dict(counts)[r] for r in SKIP_REASONS)


def bad_fraction(counts: torch.Tensor) -> float:
    seen = int(counts[0])
    return num_skipped(counts) / seen if seen else 0.0


def counts_record(counts: torch.Tensor, split: str) -> dict:
    """Flat metrics.jsonl / W&B keys: data/<split>/seen, .../skipped, .../skipped/<reason>, ...

    W&B groups charts by the first path segment, so all data-quality charts sit together under "data".
    """
    values, prefix = as_dict(counts), f"data/{split}"
    record = {f"{prefix}/seen": values["seen"], f"{prefix}/skipped": num_skipped(counts)}
    record.update({f"{prefix}/skipped/{r}": values[r] for r in SKIP_REASONS})
    record.update({f"{prefix}/converted/{c}": values[f"converted_{c}"] for c in CONVERSIONS})
    record[f"{prefix}/bad_fraction"] = round(bad_fraction(counts), 6)
    record.update({f"{prefix}/{field}": values[field] for field in NETWORK_FIELDS.values()})
    return record


def describe(counts: torch.Tensor) -> str:
    """'undecodable 3, no_label 1' (non-zero reasons only); with conversions and network events appended."""
    values = as_dict(counts)
    reasons = ", ".join(f"{r} {values[r]}" for r in SKIP_REASONS if values[r])
    converted = ", ".join(f"{c} {values[f'converted_{c}']}" for c in CONVERSIONS if values[f"converted_{c}"])
    network = describe_network(values)
    return (reasons or "none") + (f"; converted: {converted}" if converted else "") + \
        (f"; network: {network}" if network else "")


def describe_network(values: dict[str, int]) -> str:
    """'3 retries, 1 resumed mid-shard, 1 shard given up' (non-zero ones only; '' when all are zero)."""
    retries, resumed, failed = (values[f] for f in NETWORK_FIELDS.values())
    parts = [f"{retries} retr{'y' if retries == 1 else 'ies'}" if retries else "",
             f"{resumed} resumed mid-shard" if resumed else "",
             f"{failed} shard{'' if failed == 1 else 's'} given up" if failed else ""]
    return ", ".join(p for p in parts if p)


def summary_line(counts: torch.Tensor, split_name: str, epoch: int | None = None) -> str:
    """One console line about a split's bad samples (for the main process)."""
    skipped, seen = num_skipped(counts), int(counts[0])
    when = f" in epoch {epoch}" if epoch is not None else ""
    return (f"data: {skipped} of {seen} {split_name} samples skipped{when} "
            f"({100 * bad_fraction(counts):.2f}%): {describe(counts)}")


def check_threshold(counts: torch.Tensor, split_name: str, max_bad_fraction: float, root: str,
                    epoch: int | None = None) -> None:
    """Raise DataQualityError when more than `max_bad_fraction` of the samples were skipped.

    `counts` must be summed over all ranks, so every rank takes the same decision (no hang).
    """
    if num_skipped(counts) and bad_fraction(counts) > max_bad_fraction:
        when = f" in epoch {epoch}" if epoch is not None else ""
        raise DataQualityError(
            f"data.max_bad_fraction={max_bad_fraction} exceeded: {num_skipped(counts)} of {int(counts[0])} "
            f"{split_name} samples ({100 * bad_fraction(counts):.2f}%) were skipped{when} ({describe(counts)}); "
            f"find them with `pipeline data verify {root}`, or raise data.max_bad_fraction")


T = TypeVar("T")


def replace_bad(items: Iterable[T], ok: Callable[[T], bool], first_good: Callable[[], T]) -> Iterator[tuple[T, T]]:
    """(item, what stands in for it), in the items' order: the one rule for replacing a bad sample in training.

    A good item stands for itself; a bad one for the next good item after it, or, when no good one follows, for
    `first_good()` (asked only then). The choice depends only on the items from the bad one on, so a resumed run
    makes the same choices: the stream applies it to a shard slice's samples (`first_good`: the slice's first good
    one, else the split's), the main-process decoder to a batch's images (`first_good`: the batch's first good one).
    """
    pending: list[T] = []  # bad items waiting for the next good one
    for item in items:
        if ok(item):
            yield from ((bad, item) for bad in pending)
            pending = []
            yield item, item
        else:
            pending.append(item)
    if pending:
        fill = first_good()
        yield from ((bad, fill) for bad in pending)


class FaultWarnings:
    """Console warnings for the first few bad or converted samples a stream meets (then only counts)."""

    def __init__(self, limit: int = 3, prefix: str = "", who: str = "this worker"):
        self.limit, self.prefix, self.who = limit, prefix, who
        self.shown = {"skip": 0, "convert": 0}
        self.truncated_shards: set[str] = set()

    def __call__(self, check: SampleCheck, action: str) -> None:
        from pipeline.tracking.console import warn

        if check.reason == "truncated":  # one line per shard, not per missing sample
            if check.url not in self.truncated_shards:
                self.truncated_shards.add(check.url)
                why = "is not a tar file" if check.detail.startswith("NotATar") else \
                    "could not be read to its end" if "network: " in check.detail else \
                    "ends before the manifest's sample count"
                warn(f"{self.prefix}shard {check.url.rsplit('/', 1)[-1]} {why} ({check.detail}); its missing "
                     f"samples are {action} and counted as 'truncated'")
            return
        kind = "skip" if check.reason else "convert"
        if not check.reason and not check.converted:
            return
        self.shown[kind] += 1
        if self.shown[kind] > self.limit:
            return
        what = f"skipping {check.where()} ({check.reason}: {check.detail}); it is {action}" if check.reason else \
            f"converting {check.where()} ({check.detail})"
        more = f" (further {'bad' if check.reason else 'converted'} samples {self.who} meets are only counted)" \
            if self.shown[kind] == self.limit else ""
        warn(f"{self.prefix}{what}{more}")
