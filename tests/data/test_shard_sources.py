"""The shard writer's sources: split folders kept, nested folders and repeated CSV rows refused, duplicates reported."""

from __future__ import annotations

import csv
import itertools
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import Manifest
from pipeline.data.writer.shards import SOURCES_NAME, write_shards
from tests.conftest import run_cli

_colours = itertools.count()


def _png(path: Path) -> Path:
    """A 4x4 PNG whose colour no other test image has (so no two are byte-identical by accident)."""
    n = next(_colours)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (n % 256, n // 256 % 256, 7)).save(path)
    return path


def _folder(root: Path, counts: dict[str, int]) -> Path:
    """ROOT/<class>/<i>.png with `counts[class]` images each."""
    for name, count in counts.items():
        for i in range(count):
            _png(root / name / f"{i}.png")
    return root


def _provenance(out: Path) -> list[dict[str, str]]:
    with open(out / SOURCES_NAME, newline="") as handle:
        return list(csv.DictReader(handle))


def _tar_keys(out: Path, manifest: Manifest, split: str) -> list[str]:
    keys = []
    for shard in manifest.splits[split].shards:
        with tarfile.open(out / shard.name) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".png")]
    return keys


def _write(src: Path, out: Path, **kwargs) -> Manifest:
    return write_shards(src, out, max_samples=8, show_progress=False, **kwargs)


# ---- split folders ------------------------------------------------------------------------------------------

def test_split_folders_are_kept_with_exact_counts_and_provenance(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _folder(src / "train", {"cat": 6, "dog": 4})
    _folder(src / "val", {"cat": 2, "dog": 3})
    _folder(src / "test", {"cat": 3, "dog": 1})
    manifest = _write(src, tmp_path / "out")
    assert manifest.classes == ["cat", "dog"]
    assert manifest.split_source == "folders" and manifest.carved_from_train == {}
    assert manifest.split_folders == {"train": "train", "val": "val", "test": "test"}
    assert {s: m.class_counts for s, m in manifest.splits.items()} == {
        "train": {"cat": 6, "dog": 4}, "val": {"cat": 2, "dog": 3}, "test": {"cat": 3, "dog": 1}}
    rows = _provenance(tmp_path / "out")
    assert len(rows) == 19 and len({r["path"] for r in rows}) == 19  # no source file in two splits
    for row in rows:  # every image in the split of its folder, with the class of its folder
        path = Path(row["path"])
        assert (path.parent.parent.name, path.parent.name) == (row["split"], row["class"])
    assert {str(p) for p in (src / "test").rglob("*.png")} == {r["path"] for r in rows if r["split"] == "test"}
    for split in ("train", "val", "test"):  # the recorded keys are the shards' keys
        assert _tar_keys(tmp_path / "out", manifest, split) == [r["key"] for r in rows if r["split"] == split]
    assert Manifest.read(tmp_path / "out").split_folders == manifest.split_folders


def test_val_is_carved_from_train_stratified_and_seeded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _folder(src / "train", {"a": 20, "b": 10})
    _folder(src / "test", {"a": 4, "b": 2})
    runs = {name: _write(src, tmp_path / name, seed=seed, val_fraction=0.2)
            for name, seed in (("one", 3), ("same", 3), ("other", 4))}
    manifest = runs["one"]
    assert manifest.carved_from_train == {"val": 0.2} and manifest.split_folders == {"train": "train", "test": "test"}
    assert {s: m.class_counts for s, m in manifest.splits.items()} == {
        "train": {"a": 16, "b": 8}, "val": {"a": 4, "b": 2}, "test": {"a": 4, "b": 2}}
    val = {name: [r["path"] for r in _provenance(tmp_path / name) if r["split"] == "val"] for name in runs}
    assert val["one"] == val["same"] and set(val["one"]) != set(val["other"])
    assert all(Path(p).parent.parent.name == "train" for p in val["one"])  # carved from train only
    rows = _provenance(tmp_path / "one")
    assert len({r["path"] for r in rows}) == len(rows) == 36
    # Without --val-fraction the val share of --split is used: 10% of train.
    default = _write(src, tmp_path / "default", fractions=(0.8, 0.1, 0.1))
    assert default.splits["val"].class_counts == {"a": 2, "b": 1}
    assert default.splits["test"].class_counts == {"a": 4, "b": 2}  # the folder's, nothing carved


@pytest.mark.parametrize("train, val, test", [("training", "valid", "testing"), ("train", "validation", "test"),
                                              ("Train", "Val", "Test")])
def test_split_folder_aliases(tmp_path: Path, train: str, val: str, test: str) -> None:
    src = tmp_path / "src"
    for folder, count in ((train, 3), (val, 2), (test, 1)):
        _folder(src / folder, {"x": count, "y": count})
    manifest = _write(src, tmp_path / "out")
    assert manifest.split_folders == {"train": train, "val": val, "test": test}
    assert {s: m.num_samples for s, m in manifest.splits.items()} == {"train": 6, "val": 4, "test": 2}


@pytest.mark.parametrize("layout, message", [
    ({"train": ["cat", "dog"], "test": ["cat", "dog", "bird"]},
     "split folders of '{src}' have different classes (only in test/: bird); every split folder needs the same "
     "class folders as train/"),
    ({"train": ["cat", "dog"], "val": ["cat"]},
     "split folders of '{src}' have different classes (missing from val/: dog); every split folder needs the same "
     "class folders as train/"),
    ({"train": ["cat"], "val": ["cat"], "valid": ["cat"]},
     "'{src}' has 2 folders for the val split (val, valid); keep one"),
    ({"test": ["cat"], "val": ["cat"]}, "'{src}' has split folders (test, val) but no train/ (or training/)"),
    ({"train": ["cat"], "dog": []}, "'{src}' mixes split folders (train) with other folders (dog); expected either"),
])
def test_inconsistent_split_folders_are_refused(tmp_path: Path, layout: dict, message: str) -> None:
    src = tmp_path / "src"
    for folder, classes in layout.items():
        (src / folder).mkdir(parents=True)
        _folder(src / folder, {name: 2 for name in classes})
    with pytest.raises(ValueError) as error:
        _write(src, tmp_path / "out")
    assert str(error.value).startswith(message.format(src=src)) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_nested_class_folders_are_refused_in_one_line(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"cat": 2, "dog": 2, "dog/puppy": 2, "dog/old": 1})
    result = run_cli(["data", "shards", str(src), str(tmp_path / "out")], check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: class folder '{src}/dog' has sub-folders with images (old, puppy); expected "
                             "ROOT/<class>/<image> with no deeper folders, so that no label is flattened into "
                             "'dog'\n")
    (src / "cat" / "empty").mkdir()  # a sub-folder without images changes nothing
    with pytest.raises(ValueError, match=r"'.*/dog' has sub-folders with images \(old, puppy\)"):
        _write(src, tmp_path / "out")


def test_flat_imagefolder_is_still_stratified(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a": 10, "b": 10})
    manifest = _write(src, tmp_path / "out", fractions=(0.6, 0.2, 0.2))
    assert manifest.split_source == "stratified" and manifest.split_folders == {}
    assert {s: m.class_counts for s, m in manifest.splits.items()} == {
        "train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}


# ---- CSV duplicates and byte-identical files ---------------------------------------------------------------

def _csv(tmp_path: Path, rows: list[str]) -> Path:
    for i in range(8):
        for label in ("cat", "dog"):
            _png(tmp_path / "img" / f"{label}{i}.png")
    path = tmp_path / "list.csv"
    path.write_text("path,label\n" + "".join(f"{row}\n" for row in rows))
    return path


_UNIQUE = [f"img/{label}{i}.png,{label}" for i in range(8) for label in ("cat", "dog")]


def test_csv_with_repeated_paths_is_refused_naming_them(tmp_path: Path) -> None:
    src = _csv(tmp_path, _UNIQUE + ["img/cat0.png,cat", "img/dog1.png,dog", "img/cat2.png,cat", "img/cat3.png,cat",
                                    "img/cat0.png,cat"])
    result = run_cli(["data", "shards", str(src), str(tmp_path / "out")], check=False)
    assert result.returncode == 2, result.stderr
    img = tmp_path / "img"
    assert result.stderr == (f"error: '{src}' lists 4 path(s) more than once: {img}/cat0.png (rows 2, 18, 22), "
                             f"{img}/dog1.png (rows 5, 19), {img}/cat2.png (rows 6, 20) and 1 more; remove the "
                             "repeated rows, or pass --dedupe to keep one row of each\n")
    assert not (tmp_path / "out").exists()


def test_dedupe_keeps_one_row_per_path_with_a_warning(tmp_path: Path, capsys) -> None:
    src = _csv(tmp_path, _UNIQUE + ["img/cat0.png,cat", "img/dog1.png,dog", "img/cat0.png,cat"])
    manifest = _write(src, tmp_path / "out", dedupe=True, fractions=(0.5, 0.25, 0.25))
    assert {s: m.class_counts for s, m in manifest.splits.items()} == {
        "train": {"cat": 4, "dog": 4}, "val": {"cat": 2, "dog": 2}, "test": {"cat": 2, "dog": 2}}
    rows = _provenance(tmp_path / "out")
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in (tmp_path / "img").glob("*.png"))
    warning = capsys.readouterr().err
    assert "lists 2 path(s) more than once" in warning and "dropped 3 row(s) (--dedupe)" in warning
    assert manifest.duplicate_sources == []


def test_csv_path_with_two_labels_is_refused_even_with_dedupe(tmp_path: Path) -> None:
    src = _csv(tmp_path, _UNIQUE + ["img/cat0.png,dog", "./img/../img/dog1.png,cat"])
    result = run_cli(["data", "shards", str(src), str(tmp_path / "out"), "--dedupe"], check=False)
    assert result.returncode == 2, result.stderr
    img = tmp_path / "img"
    assert result.stderr == (f"error: '{src}' gives 2 path(s) two or more labels: {img}/cat0.png (cat, dog), "
                             f"{img}/dog1.png (cat, dog); give each image one label\n")


def test_byte_identical_files_under_other_names_are_reported(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    _folder(src / "train", {"cat": 4, "dog": 4})
    _folder(src / "test", {"cat": 2, "dog": 2})
    (src / "test" / "dog" / "copy.png").write_bytes((src / "train" / "cat" / "0.png").read_bytes())
    (src / "train" / "cat" / "copy.png").write_bytes((src / "train" / "cat" / "1.png").read_bytes())
    manifest = _write(src, tmp_path / "out", fractions=(1.0, 0.0, 0.0))
    groups = sorted(sorted((f["path"], f["class"], f["split"]) for f in g["files"]) for g in manifest.duplicate_sources)
    assert groups == [
        [(f"{src}/test/dog/copy.png", "dog", "test"), (f"{src}/train/cat/0.png", "cat", "train")],
        [(f"{src}/train/cat/1.png", "cat", "train"), (f"{src}/train/cat/copy.png", "cat", "train")]]
    lines = [line for line in capsys.readouterr().err.splitlines() if "byte-identical" in line]
    assert len(lines) == 2
    assert any("2 byte-identical source files across classes and splits" in line for line in lines)
    assert Manifest.read(tmp_path / "out").duplicate_sources == manifest.duplicate_sources
