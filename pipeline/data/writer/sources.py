"""Find the source images of `pipeline data shards`: an ImageFolder (flat, or with split folders) or a CSV.

A flat ImageFolder is `ROOT/<class>/<image>`; one with split folders is `ROOT/<split>/<class>/<image>`
(`train`/`training`, `val`/`valid`/`validation`, `test`/`testing`), and the writer keeps that split.
Anything that would silently give wrong labels is refused with one line: a class folder holding
sub-folders of images (their labels would be flattened into the parent's), split folders with
different class sets, a CSV listing one path twice (with `dedupe`, same-label repeats are dropped
instead; two labels for one path are always refused).

What a label is depends on the task (`task`, the writer's `--task`; docs/tasks.md):
- `classification`: one class per image, from the ImageFolder's class folder or the CSV's `path,label`;
- `multilabel` (CSV only): `path,cat;dog`, the class names separated by `;`, an empty field for an image with none
  of the classes (`path,`); the classes are the sorted names found;
- `regression` (CSV only): `path,12.5` or `path,0.1;3` (the same count of numbers on every row); the outputs are
  named `target` (one) or `target0`, `target1`, ... .
An ImageFolder's folder per class cannot express a label set or a number, so it is classification only.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from pipeline.data.dataset.keys import TargetLabel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
"""Folder name -> the split it holds (names compared in lower case)."""
SHOWN = 3
"""Items a one-line message names before 'and N more'."""
LABEL_SEPARATOR = ";"
"""Between the class names (multilabel) or numbers (regression) of a CSV's label field."""
TARGET_NAME = "target"
"""Regression from a CSV: the name of its one output (several: target0, target1, ...)."""
CsvLabel = Union[str, tuple]
"""A CSV label as parsed: a class name, a sorted tuple of distinct class names, or a tuple of floats."""


@dataclass(frozen=True)
class SourceImage:
    """One source file, its label and, when the source has split folders, the split it belongs to."""

    path: Path
    label: TargetLabel
    """A class index; multilabel: sorted class indices; regression: the floats (as `SampleKeys.label` gives them)."""
    split: str = ""


@dataclass
class Sources:
    """What a source holds: images (unique paths), class names, and the split folders it had (split -> name)."""

    images: list[SourceImage]
    classes: list[str]
    split_folders: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Warnings for the user (e.g. rows dropped by `dedupe`)."""
    task: str = "classification"
    """What a label is: classification, multilabel or regression (the module docstring); regression's classes are
    the outputs' names."""

    def label_text(self, label: TargetLabel) -> str:
        """A label as one text (for sources.csv and messages): the class name, names joined by ';', or numbers."""
        if self.task == "multilabel":
            return LABEL_SEPARATOR.join(self.classes[i] for i in label)
        if self.task == "regression":
            return LABEL_SEPARATOR.join(str(v) for v in label)
        return self.classes[label]


def _listing(items: list[str], shown: int = SHOWN) -> str:
    """'a, b, c and 4 more': the first few of a list for a one-line message."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _class_images(class_dir: Path) -> list[Path]:
    """The images directly in a class folder; refuses one whose sub-folders hold images (labels would be lost)."""
    nested = sorted({p.parent.relative_to(class_dir).parts[0] for p in class_dir.rglob("*/*") if _is_image(p)})
    if nested:
        hint = ("; split folders go on top: ROOT/<split>/<class>/<image>" if any(n.lower() in SPLIT_FOLDERS
                                                                                  for n in nested) else "")
        raise ValueError(f"class folder '{class_dir}' has sub-folders with images ({_listing(nested)}); expected "
                         f"ROOT/<class>/<image> with no deeper folders, so that no label is flattened into "
                         f"'{class_dir.name}'{hint}")
    return sorted(p for p in class_dir.iterdir() if _is_image(p))


def _scan_classes(root: Path) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted, as torchvision's ImageFolder orders them) and each class's images."""
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise ValueError(f"'{root}' has no class sub-folders; expected ROOT/<class>/<image> files")
    return [d.name for d in class_dirs], [_class_images(d) for d in class_dirs]


def _split_folder_names(root: Path) -> dict[str, str]:
    """split -> folder name when ROOT's sub-folders are split folders; {} for a flat ImageFolder."""
    folders = [p.name for p in _subfolders(root)]
    splits = [name for name in folders if name.lower() in SPLIT_FOLDERS]
    if not splits:
        return {}
    others = [name for name in folders if name.lower() not in SPLIT_FOLDERS]
    if others:
        raise ValueError(f"'{root}' mixes split folders ({_listing(splits)}) with other folders "
                         f"({_listing(others)}); expected either ROOT/<class>/<image> or ROOT/<split>/<class>/<image> "
                         f"with splits {', '.join(SPLIT_FOLDERS)}")
    by_split: dict[str, list[str]] = defaultdict(list)
    for name in splits:
        by_split[SPLIT_FOLDERS[name.lower()]].append(name)
    twice = {split: names for split, names in by_split.items() if len(names) > 1}
    if twice:
        split, names = next(iter(twice.items()))
        raise ValueError(f"'{root}' has {len(names)} folders for the {split} split ({', '.join(names)}); keep one")
    if "train" not in by_split:
        raise ValueError(f"'{root}' has split folders ({', '.join(splits)}) but no train/ (or training/)")
    return {split: names[0] for split, names in sorted(by_split.items(), key=lambda kv: ("train", "val", "test")
                                                       .index(kv[0]))}


def scan_imagefolder(root: Path) -> Sources:
    """A flat ImageFolder, or one with split folders (each with the same class folders)."""
    split_folders = _split_folder_names(root)
    if not split_folders:
        classes, per_class = _scan_classes(root)
        images = [SourceImage(path, label) for label, paths in enumerate(per_class) for path in paths]
        return Sources(images, classes)
    scanned = {split: _scan_classes(root / name) for split, name in split_folders.items()}
    train_classes = scanned["train"][0]
    for split, (classes, _) in scanned.items():
        if classes != train_classes:
            only_here = sorted(set(classes) - set(train_classes))
            missing = sorted(set(train_classes) - set(classes))
            detail = "; ".join(part for part in (
                f"only in {split_folders[split]}/: {_listing(only_here)}" if only_here else "",
                f"missing from {split_folders[split]}/: {_listing(missing)}" if missing else "") if part)
            raise ValueError(f"split folders of '{root}' have different classes ({detail}); every split folder "
                             f"needs the same class folders as {split_folders['train']}/")
    images = [SourceImage(path, label, split) for split, (_, per_class) in scanned.items()
              for label, paths in enumerate(per_class) for path in paths]
    return Sources(images, train_classes, split_folders)


def _csv_rows(csv_path: Path, task: str) -> list[tuple[int, Path, CsvLabel]]:
    """(row number, absolute normalised path, parsed label) of every `path,label` row (header optional); an empty
    label field is an image with no class only for multilabel."""
    rows = list(enumerate(csv.reader(csv_path.read_text().splitlines()), 1))
    rows = [(number, row) for number, row in rows if row]
    if rows and rows[0][1][:2] == ["path", "label"]:
        rows = rows[1:]
    bad = [number for number, row in rows if len(row) < 2 or (task != "multilabel" and not row[1].strip())]
    if bad:
        raise ValueError(f"'{csv_path}' row(s) {bad[:5]} are not 'path,label'")
    parsed = []
    for number, row in rows:
        path = Path(row[0].strip())
        path = Path(os.path.normpath(path if path.is_absolute() else csv_path.parent.absolute() / path))
        parsed.append((number, path, _parsed_label(row[1], task)))
    _check_numbers(csv_path, [(number, label) for number, _, label in parsed], task)
    return parsed


def _parsed_label(text: str, task: str) -> CsvLabel:
    """classification: the name; multilabel: the sorted distinct names; regression: the numbers (a text that is no
    number stays text, for `_check_numbers` to name)."""
    if task == "classification":
        return text.strip()
    items = [item.strip() for item in text.split(LABEL_SEPARATOR) if item.strip()]
    if task == "multilabel":
        return tuple(sorted(set(items)))
    try:
        return tuple(float(item) for item in items)
    except ValueError:
        return text.strip()


def _check_numbers(csv_path: Path, labels: list[tuple[int, CsvLabel]], task: str) -> None:
    """Regression: every row holds finite numbers, as many as the first row; else a ValueError naming the rows."""
    if task != "regression":
        return
    bad = [number for number, label in labels if isinstance(label, str) or not label
           or not all(math.isfinite(v) for v in label)]
    if bad:
        raise ValueError(f"'{csv_path}' row(s) {bad[:5]} hold no finite numbers separated by '{LABEL_SEPARATOR}' "
                         f"(--task regression: 'path,12.5' or 'path,0.1;3')")
    lengths = sorted({len(label) for _, label in labels})
    if len(lengths) > 1:
        odd = [number for number, label in labels if len(label) != len(labels[0][1])]
        raise ValueError(f"'{csv_path}' rows hold {' or '.join(map(str, lengths))} numbers (first row: "
                         f"{len(labels[0][1])}; row(s) {odd[:5]} differ); give every image the same number")


def _shown_label(label: CsvLabel) -> str:
    return label if isinstance(label, str) else LABEL_SEPARATOR.join(str(item) for item in label)


def _repeated_paths(csv_path: Path, rows: list[tuple[int, Path, CsvLabel]], dedupe: bool) -> tuple[list[int], str]:
    """Row numbers to drop (repeats of a path with its same label) and a note, or a ValueError naming them."""
    by_path: dict[Path, list[tuple[int, CsvLabel]]] = defaultdict(list)
    for number, path, label in rows:
        by_path[path].append((number, label))
    repeated = {path: entries for path, entries in by_path.items() if len(entries) > 1}
    conflicting = {path: entries for path, entries in repeated.items() if len({lab for _, lab in entries}) > 1}
    if conflicting:
        shown = [f"{path} ({', '.join(sorted({_shown_label(lab) for _, lab in e}))})"
                 for path, e in conflicting.items()]
        raise ValueError(f"'{csv_path}' gives {len(conflicting)} path(s) two or more labels: {_listing(shown)}; "
                         "give each image one label")
    if not repeated:
        return [], ""
    shown = [f"{path} (rows {', '.join(str(n) for n, _ in e)})" for path, e in repeated.items()]
    listing = f"'{csv_path}' lists {len(repeated)} path(s) more than once: {_listing(shown)}"
    if not dedupe:
        raise ValueError(f"{listing}; remove the repeated rows, or pass --dedupe to keep one row of each")
    dropped = [number for entries in repeated.values() for number, _ in entries[1:]]
    return dropped, f"{listing}; kept the first row of each, dropped {len(dropped)} row(s) (--dedupe)"


def _classes_and_labels(labels: list[CsvLabel], task: str) -> tuple[list[str], list[TargetLabel]]:
    """The class names (regression: the outputs') and each row's label as `SourceImage.label`."""
    if task == "regression":
        count = len(labels[0]) if labels else 1
        return [TARGET_NAME] if count == 1 else [f"{TARGET_NAME}{i}" for i in range(count)], list(labels)
    names = sorted({name for label in labels for name in label}) if task == "multilabel" else sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    if task == "multilabel":
        return names, [tuple(index[name] for name in label) for label in labels]
    return names, [index[label] for label in labels]


def _separator_note(csv_path: Path, classes: list[str], task: str) -> list[str]:
    """A warning when single-label class names hold the label separator: probably label sets (--task multilabel)."""
    joined = [name for name in classes if LABEL_SEPARATOR in name]
    if task != "classification" or not joined:
        return []
    return [f"'{csv_path}': {len(joined)} class name(s) hold '{LABEL_SEPARATOR}' ({_listing(joined)}); each is one "
            f"class here; for label sets pass --task multilabel"]


def scan_csv(csv_path: Path, dedupe: bool = False, task: str = "classification") -> Sources:
    """Rows of `path,label` (relative paths are relative to the CSV's folder; the label as `task` reads it, see the
    module docstring); each path listed once."""
    rows = _csv_rows(csv_path, task)
    dropped, note = _repeated_paths(csv_path, rows, dedupe)
    skip = set(dropped)
    rows = [row for row in rows if row[0] not in skip]
    classes, labels = _classes_and_labels([label for _, _, label in rows], task)
    if task == "multilabel" and len(classes) < 2:
        raise ValueError(f"'{csv_path}' names {len(classes)} class(es) ({', '.join(classes) or 'none'}) in its label "
                         f"sets; --task multilabel needs at least 2")
    images = [SourceImage(path, label) for (_, path, _), label in zip(rows, labels)]
    notes = ([note] if note else []) + _separator_note(csv_path, classes, task)
    return Sources(images, classes, notes=notes, task=task)


def scan_source(src: Path, dedupe: bool = False, task: str = "classification") -> Sources:
    """The images of a CSV file or an ImageFolder root (classification only); every source path appears once."""
    if not src.is_file() and task != "classification":
        raise ValueError(f"--task {task} needs a CSV of path,label ('{src}' is a folder): an ImageFolder gives each "
                         f"image the one class of its folder, which cannot hold a label set or a number")
    sources = scan_csv(src, dedupe, task) if src.is_file() else scan_imagefolder(src)
    paths = [im.path for im in sources.images]
    assert len(set(paths)) == len(paths), "a source path was listed twice"  # each file lands in one split only
    return sources
