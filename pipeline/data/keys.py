"""Which members of a WebDataset sample are the image and the label, and how a label becomes a class index.

Samples group tar members by name up to the first dot; the rest of the name is the member's key
(`0001.jpg` -> `jpg`, `0001.seg.png` -> `seg.png`). `data.image_key` names the image (empty: the first
of `IMAGE_KEYS` present). `data.label_key` names the label and how to read it:

- `cls` (webdataset's convention, the default): an integer as text; a class name is accepted too;
- `txt` (or any other key): the text is a class name, or an integer when it is one;
- `json.<field>` (nested: `json.annotation.label`): a field of the sample's JSON; an integer is the
  class index, a string a class name.

A class name maps to its index in the dataset's class list (`data.classes`, a `classes.txt` beside the
shards, or the sorted names found while indexing). `raw_label` gives the value as found (int or str),
which the index counts; `label` gives the class index, or the skip reason (`no_label`, `bad_label`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

IMAGE_KEYS = ("png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff", "gif", "ppm")
RawLabel = Union[int, str]


@dataclass(frozen=True)
class SampleKeys:
    """The image and label keys of a dataset's samples, and its class names (picklable, sent to workers).

    `label_key` is checked by the config schema (DataConfig)."""

    image_key: str = ""
    label_key: str = "cls"
    classes: tuple[str, ...] = ()

    @property
    def member(self) -> str:
        """The sample key the label is read from (json for json.<field>)."""
        return "json" if self.label_key.partition(".")[0] == "json" else self.label_key

    def image(self, sample: dict) -> Optional[str]:
        """The key of the sample's image, or None when it has none."""
        if self.image_key:
            return self.image_key if self.image_key in sample else None
        return next((k for k in IMAGE_KEYS if k in sample), None)

    def raw_label(self, sample: dict) -> tuple[Optional[RawLabel], str]:
        """(the label as found: an int or a class name, '') or (None, why there is none)."""
        data = sample.get(self.member)
        if data is None:
            keys = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            return None, f"no '{self.member}' label (keys: {keys})"
        if self.member != "json":
            return _text_label(data)
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            return None, f"its json is not valid ({type(exc).__name__})"
        for part in self.label_key.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                return None, f"its json has no field '{self.label_key[5:]}'"
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
            return None, f"json field '{self.label_key[5:]}' is {value!r}, not a class index or name"
        return value, ""

    def label(self, sample: dict, num_classes: int | None) -> tuple[int, str, str]:
        """(class index, reason, detail): reason is '' for a usable label, else no_label or bad_label."""
        raw, why = self.raw_label(sample)
        if raw is None:
            return -1, "no_label", why
        return self.index_of(raw, num_classes)

    def index_of(self, raw: RawLabel, num_classes: int | None) -> tuple[int, str, str]:
        if isinstance(raw, str):
            if raw in self.classes:
                return self.classes.index(raw), "", ""
            if not self.classes:
                return -1, "no_label", f"label {raw[:20]!r} is a name, but the dataset has no class names"
            return -1, "bad_label", f"label {raw[:20]!r} is not one of the {len(self.classes)} class names"
        if num_classes is not None and not 0 <= raw < num_classes:
            return raw, "bad_label", f"label {raw} is outside the {num_classes} classes (0..{num_classes - 1})"
        return raw, "", ""


def _text_label(data: bytes) -> tuple[Optional[RawLabel], str]:
    try:
        text = bytes(data).decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"label {bytes(data)[:20]!r} is not text"
    if not text:
        return None, "the label is empty"
    try:
        return int(text), ""
    except ValueError:
        return text, ""


DEFAULT_KEYS = SampleKeys()
