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

`task` (task.type) changes what a label is (docs/tasks.md):
- `multilabel`: a list of class indices or names (JSON `[2, 7]` / `["cat", "dog"]`; text `2,7`); `[]` is an
  image with none of the classes. `label` gives the sorted distinct indices; `collate` a multi-hot float batch.
- `regression`: a number or a list of numbers (JSON `12.5` / `[0.1, 3]`; text `12.5` or `0.1,3`); `label`
  gives the floats, `collate` a float batch (N x outputs). A non-finite number is a bad label.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

IMAGE_KEYS = ("png", "jpg", "jpeg", "bmp", "webp", "tif", "tiff", "gif", "ppm")
RawLabel = Union[int, str, tuple]
TargetLabel = Union[int, tuple]
"""A usable label: a class index (classification), sorted class indices (multilabel) or floats (regression)."""


@dataclass(frozen=True)
class SampleKeys:
    """The image and label keys of a dataset's samples, and its class names (picklable, sent to workers).

    `label_key` is checked by the config schema (DataConfig)."""

    image_key: str = ""
    label_key: str = "cls"
    classes: tuple[str, ...] = ()
    task: str = "classification"
    """task.type: classification, multilabel or regression (what a label is; see the module docstring)."""

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
            if self.task == "classification":
                return _text_label(data)
            text, why = _text(data)
            return (None, why) if text is None else self._shaped([_number(t) for t in text.split(",") if t.strip()]
                                                                 if "," in text or self.task == "regression"
                                                                 else [_number(text)], "the label")
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            return None, f"its json is not valid ({type(exc).__name__})"
        for part in self.label_key.split(".")[1:]:
            if not isinstance(value, dict) or part not in value:
                return None, f"its json has no field '{self.label_key[5:]}'"
            value = value[part]
        if self.task != "classification":
            return self._shaped(value, f"json field '{self.label_key[5:]}'")
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
            return None, f"json field '{self.label_key[5:]}' is {value!r}, not a class index or name"
        return value, ""

    def _shaped(self, value: object, what: str) -> tuple[Optional[RawLabel], str]:
        """A multilabel or regression label as found: a tuple of class indices/names, or of numbers."""
        items = value if isinstance(value, list) else [value]
        if self.task == "regression":
            if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                return None, f"{what} is {_short(value)}, not a number or a list of numbers"
            return tuple(float(v) for v in items), ""
        if not all(isinstance(v, (int, str)) and not isinstance(v, bool) and v != "" for v in items):
            return None, f"{what} is {_short(value)}, not a list of class indices or names"
        return tuple(items), ""

    def label(self, sample: dict, num_classes: int | None) -> tuple[TargetLabel, str, str]:
        """(target, reason, detail): reason is '' for a usable label, else no_label or bad_label. The target is a
        class index, or a tuple (multilabel: sorted class indices; regression: num_classes floats)."""
        raw, why = self.raw_label(sample)
        if raw is None:
            return -1, "no_label", why
        if self.task == "regression":
            if num_classes is not None and len(raw) != num_classes:
                return -1, "bad_label", f"label has {len(raw)} value(s); the task has {num_classes} output(s)"
            if not all(math.isfinite(v) for v in raw):
                return -1, "bad_label", f"label {_short(list(raw))} is not finite"
            return raw, "", ""
        if self.task == "multilabel":
            indices = []
            for item in raw:
                index, reason, detail = self.index_of(item, num_classes)
                if reason:
                    return -1, reason, detail
                indices.append(index)
            return tuple(sorted(set(indices))), "", ""
        return self.index_of(raw, num_classes)

    def collate(self, labels: list, num_classes: int | None) -> torch.Tensor:
        """A batch of targets from `label`: class indices (long), multi-hot (float, N x classes) or values (float)."""
        if self.task == "classification":
            return torch.tensor(labels, dtype=torch.long)
        if self.task == "regression":
            return torch.tensor(labels, dtype=torch.float32).reshape(len(labels), -1)
        hot = torch.zeros(len(labels), num_classes or 0)
        for row, indices in enumerate(labels):
            hot[row, list(indices)] = 1.0
        return hot

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


def _text(data: bytes) -> tuple[Optional[str], str]:
    try:
        text = bytes(data).decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"label {bytes(data)[:20]!r} is not text"
    return (text, "") if text else (None, "the label is empty")


def _text_label(data: bytes) -> tuple[Optional[RawLabel], str]:
    text, why = _text(data)
    if text is None:
        return None, why
    try:
        return int(text), ""
    except ValueError:
        return text, ""


def _number(text: str) -> int | float | str:
    """'3' -> 3, '2.5' -> 2.5, anything else stays text (a class name)."""
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


DEFAULT_KEYS = SampleKeys()
