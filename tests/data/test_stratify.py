"""Stratification of label sets and numbers: iterative stratification (multi-label) and quantile bins (regression) in
`pipeline data shards` and `pipeline cv`, the CSV forms that carry them, and real CLI runs on tiny images."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks.stratify_folds import missing, shuffled_folds, tag_set
from pipeline.commands.cv import fold_assignment
from pipeline.config import load_config
from pipeline.data.dataset.manifest import Manifest
from pipeline.data.writer.sources import scan_csv, scan_source
from pipeline.data.writer.stratify import multi_hot, proportion_deviation, quantile_bins, stratified_split
from pipeline.run.data import load_manifest
from tests.conftest import TINY, read_jsonl, run_cli

NAMES = ["cat", "dog", "ship", "rare"]
RUN = [*TINY, "train.epochs=1", "data.num_workers=0", "train.batch_size=8"]
"""A 1-epoch tiny run on the 8 px grayscale images below (configs/default.yaml: 1 channel)."""


# ---- folds and splits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iterative_folds_keep_rare_labels_in_every_fold_and_beat_shuffled_kfold(seed: int) -> None:
    labels = tag_set(300, 10, 5, seed)  # long-tailed: 10 classes, prevalence 0.4 / rank; the rarest has 5 positives
    hot = multi_hot(labels, 10)
    ours = fold_assignment(labels, 5, seed, "multilabel", [f"c{i}" for i in range(10)])
    shuffled = shuffled_folds(len(labels), 5, seed)
    assert sorted(np.bincount(ours).tolist()) == [60] * 5
    assert proportion_deviation(hot, ours) < proportion_deviation(hot, shuffled) / 3  # measured: ~0.0045 vs ~0.025
    assert missing(hot, ours) == 0 and missing(hot, shuffled) >= 1  # every class, the 5-positive one too, per fold
    assert np.bincount(ours[hot[:, -1]], minlength=5).tolist() == [1] * 5
    assert np.array_equal(ours, fold_assignment(labels, 5, seed, "multilabel", [f"c{i}" for i in range(10)]))


def test_regression_folds_hold_every_quantile_bin_equally() -> None:
    values = np.random.default_rng(0).lognormal(0.0, 1.0, 200)
    assignment = fold_assignment([(float(v), 1.0) for v in values], 5, 0, "regression", ["a", "b"])
    deciles = quantile_bins(values, 10, 5)
    assert np.bincount(deciles).tolist() == [20] * 10
    for fold in range(5):  # 4 of each decile of the first output in every fold
        assert np.bincount(deciles[assignment == fold], minlength=10).tolist() == [4] * 10


def test_quantile_bins_merge_ties_and_give_up_below_two_bins() -> None:
    assert quantile_bins(np.array([1.0] * 8 + [2.0] * 4), 10, 2).tolist() == [0] * 8 + [1] * 4
    assert quantile_bins(np.array([3.0] * 9), 10, 2) is None  # one value: nothing to stratify by
    assert quantile_bins(np.arange(5.0), 10, 3) is None  # two bins of 3 need 6 values


def test_impossible_folds_are_refused_and_thin_ones_warned_in_one_line(capsys) -> None:
    with pytest.raises(ValueError, match=r"^cv.folds=4 is more than the 3 labelled samples of train\+val$"):
        fold_assignment([(0,), (1,), (0, 1)], 4, 0, "multilabel", ["a", "b"])
    with pytest.raises(ValueError, match=r"^cv.folds=6 is more than the 5 labelled samples"):
        fold_assignment([(float(v),) for v in range(5)], 6, 0, "regression", ["y"])
    labels = [(0,)] * 8 + [(0, 1)] * 2
    assert sorted(np.bincount(fold_assignment(labels, 3, 0, "multilabel", ["a", "b"])).tolist()) == [3, 3, 4]
    err = capsys.readouterr().err
    assert "cv: 1 class(es) occur in fewer than cv.folds=3 samples of train+val: 'b' (2)" in err
    assignment = fold_assignment([(float(v),) for v in range(5)], 3, 0, "regression", ["y"])
    assert sorted(np.bincount(assignment).tolist()) == [1, 2, 2]  # a shuffled KFold
    assert "cannot make two quantile bins of 3 samples each; the folds are shuffled" in capsys.readouterr().err


def test_a_split_of_label_sets_keeps_sizes_and_every_class_share() -> None:
    labels = tag_set(400, 8, 5, 0)
    parts = stratified_split(labels, (0.7, 0.15, 0.15), 0, "multilabel", 8)
    assert [len(p) for p in parts] == [280, 60, 60]
    assert sorted(np.concatenate(parts).tolist()) == list(range(400))
    hot = multi_hot(labels, 8)
    for part in parts:  # each split's share of every class within 2.5 points of the whole set's
        assert np.abs(hot[part].mean(axis=0) - hot.mean(axis=0)).max() < 0.025
    assert all(np.array_equal(a, b) for a, b in zip(parts, stratified_split(labels, (0.7, 0.15, 0.15), 0,
                                                                            "multilabel", 8)))
    numbers = [(float(v),) for v in np.random.default_rng(0).normal(size=100)]
    assert [len(p) for p in stratified_split(numbers, (0.7, 0.15, 0.15), 0, "regression", 1)] == [70, 15, 15]


# ---- CSV forms ------------------------------------------------------------------------------------------------
def _csv(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "list.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_label_sets_and_numbers_are_parsed_per_task(tmp_path: Path) -> None:
    sets = scan_csv(_csv(tmp_path, ["path,label", "a.png,dog;cat", "b.png,", "c.png, ship ;dog;dog"]),
                    task="multilabel")
    assert sets.classes == ["cat", "dog", "ship"] and [im.label for im in sets.images] == [(0, 1), (), (1, 2)]
    assert sets.label_text((1, 2)) == "dog;ship"
    numbers = scan_csv(_csv(tmp_path, ["a.png,12.5;-1", "b.png,3;0"]), task="regression")
    assert numbers.classes == ["target0", "target1"] and [im.label for im in numbers.images] == [(12.5, -1.0),
                                                                                                 (3.0, 0.0)]
    assert scan_csv(_csv(tmp_path, ["a.png,2.5"]), task="regression").classes == ["target"]
    single = scan_csv(_csv(tmp_path, ["a.png,cat;dog", "b.png,cat"]))
    assert single.classes == ["cat", "cat;dog"] and "for label sets pass --task multilabel" in single.notes[0]


@pytest.mark.parametrize("lines, task, message", [
    (["a.png,1;x"], "regression", "row(s) [1] hold no finite numbers separated by ';'"),
    (["a.png,nan"], "regression", "row(s) [1] hold no finite numbers"),
    (["a.png,1", "b.png,1;2"], "regression", "rows hold 1 or 2 numbers (first row: 1; row(s) [2] differ)"),
    (["a.png,"], "regression", "row(s) [1] are not 'path,label'"),
    (["a.png,cat;dog", "a.png,dog"], "multilabel", "gives 1 path(s) two or more labels"),
    (["a.png,cat", "b.png,"], "multilabel", "names 1 class(es) (cat) in its label sets; --task multilabel needs"),
])
def test_bad_csv_labels_are_refused_in_one_line(tmp_path: Path, lines: list[str], task: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as error:
        scan_csv(_csv(tmp_path, lines), task=task)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_repeated_row_with_the_same_set_in_another_order_is_a_repeat(tmp_path: Path) -> None:
    sources = scan_csv(_csv(tmp_path, ["a.png,cat;dog", "a.png,dog;cat", "b.png,cat"]), dedupe=True, task="multilabel")
    assert [im.label for im in sources.images] == [(0, 1), (0,)]


def test_an_image_folder_cannot_hold_label_sets(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match=r"^--task multilabel needs a CSV of path,label .* an ImageFolder gives each "
                                         r"image the one class of its folder"):
        scan_source(tmp_path, task="multilabel")


def test_manifests_without_a_task_read_as_single_label(tmp_path: Path) -> None:
    data = {"classes": ["a", "b"], "splits": {"train": {"num_samples": 2, "class_counts": {"a": 1, "b": 1},
                                                        "shards": []}}}
    data["splits"]["train"]["shards"] = [{"name": "train-000000.tar", "num_samples": 2, "num_bytes": 1, "sha256": ""}]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    old = Manifest.read(tmp_path)
    assert (old.task, old.label_key, old.split("train").targets) == ("classification", "cls", {})
    data["splits"]["train"]["class_counts"] = {"a": 2, "b": 1}  # positives: a sample may count for both
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "task": "multilabel", "label_key": "json.labels"}))
    assert Manifest.read(tmp_path).split("train").class_counts == {"a": 2, "b": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"splits.train.class_counts=.* adds up to 3, not num_samples=2"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "task": "ranking"}))
    with pytest.raises(ValueError, match=r"task='ranking' must be one of classification, multilabel, regression"):
        Manifest.read(tmp_path)


# ---- real runs on tiny images ---------------------------------------------------------------------------------
def _images(folder: Path, count: int) -> list[str]:
    """`count` 8 x 8 grayscale images, PNG and JPEG in turn; their names relative to `folder`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img/{i:03d}.{'png' if i % 2 else 'jpg'}"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / name)
        names.append(name)
    return names


def _samples(root: Path) -> dict[str, list[dict]]:
    """split -> every written sample's members (json parsed), read from the tars the manifest lists."""
    manifest, found = Manifest.read(root), {}
    for split, info in manifest.splits.items():
        found[split] = []
        for shard in info.shards:
            with tarfile.open(root / shard.name) as tar:
                members = {}
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(member).read()
            found[split] += [{**m, "json": json.loads(m["json"])} if "json" in m else m for m in members.values()]
    return found


@pytest.fixture(scope="module")
def label_sets(tmp_path_factory) -> tuple[Path, dict[str, tuple], str]:
    """48 images with label sets (`rare` on 4 of them; every 8th, and some more, with none) in a CSV, written by
    `pipeline data shards --task multilabel`: (the shards, source path -> sorted label names, the command's stdout)."""
    folder = tmp_path_factory.mktemp("label_sets")
    rng = np.random.default_rng(1)
    truth = {}
    for i, name in enumerate(_images(folder, 48)):
        tags = [n for n, p in zip(NAMES[:3], (0.6, 0.4, 0.3)) if rng.random() < p] + (["rare"] if i % 12 == 5 else [])
        truth[name] = tuple(sorted(tags)) if i % 8 else ()
    (folder / "tags.csv").write_text("path,label\n" + "".join(f"{p},{';'.join(t)}\n" for p, t in truth.items()))
    out = folder / "shards"
    result = run_cli(["data", "shards", str(folder / "tags.csv"), str(out), "--task", "multilabel", "--split",
                      "0.5,0.25,0.25", "--max-samples", "10"])
    return out, {str(folder / p): t for p, t in truth.items()}, result.stdout


def test_shards_of_label_sets_hold_each_images_set_and_train(label_sets, tmp_path: Path) -> None:
    out, truth, stdout = label_sets
    assert "split 0.5, 0.25, 0.25: iterative stratification of the label sets (seed 0)" in stdout
    assert f"train with: pipeline train CONFIG data.root={out} task.type=multilabel data.label_key=json.labels" \
        in stdout
    manifest, samples = Manifest.read(out), _samples(out)
    assert (manifest.task, manifest.label_key, manifest.split_source) == ("multilabel", "json.labels", "iterative")
    assert manifest.classes == sorted(NAMES)
    assert {split: len(found) for split, found in samples.items()} == {"train": 24, "val": 12, "test": 12}
    assert all("cls" not in s and set(s["json"]) == {"labels"} for found in samples.values() for s in found)
    written = Counter(tuple(s["json"]["labels"]) for found in samples.values() for s in found)
    assert written == Counter(truth.values()) and written[()] >= 6  # images with no class are written too
    rows = [line.split(",") for line in (out / "sources.csv").read_text().splitlines()[1:]]
    by_key = {(split, key): path for split, _, key, _, path in rows}
    for split, found in samples.items():  # each sample carries its own image's set
        for position, sample in enumerate(found):
            assert tuple(sample["json"]["labels"]) == truth[by_key[(split, f"{position:08d}")]]
        positives = Counter(name for s in found for name in s["json"]["labels"])
        assert manifest.split(split).class_counts == {name: positives[name] for name in manifest.classes}
    assert [sum("rare" in s["json"]["labels"] for s in samples[split]) for split in ("train", "val", "test")] == [
        2, 1, 1]  # 4 positives spread as the split's shares
    run_cli(["train", f"data.root={out}", "task.type=multilabel", "data.label_key=json.labels", *RUN,
             f"run.output_dir={tmp_path}", "run.name=m"])
    test = json.loads((tmp_path / "m" / "test_metrics.json").read_text())
    assert test["num_samples"] == 12 and 0 <= test["map_macro"] <= 1
    assert read_jsonl(tmp_path / "m" / "metrics.jsonl")[0]["epoch"] == 1
    with pytest.raises(ValueError) as wrong:  # trained as single-label: one line saying what to give
        load_manifest(load_config(None, [f"data.root={out}"]))
    assert str(wrong.value) == (f"data.root='{out}' holds multilabel labels under 'json.labels'; train with "
                                f"task.type=multilabel data.label_key=json.labels (given: task.type=classification "
                                f"data.label_key=cls)")


def test_cv_folds_label_sets_end_to_end(label_sets, tmp_path: Path) -> None:
    out, truth, _ = label_sets
    run_cli(["cv", "configs/default.yaml", f"data.root={out}", "task.type=multilabel", "data.label_key=json.labels",
             "cv.folds=2", *RUN, f"cv.data_dir={tmp_path / 'folds'}", f"run.output_dir={tmp_path}", "run.name=m"])
    source = _samples(out)
    pool = Counter(tuple(s["json"]["labels"]) for split in ("train", "val") for s in source[split])
    vals, rare = Counter(), []
    for fold in range(2):
        manifest, found = Manifest.read(tmp_path / "folds" / f"fold{fold}"), _samples(tmp_path / "folds" /
                                                                                     f"fold{fold}")
        assert (manifest.task, manifest.label_key, manifest.split_source) == ("multilabel", "json.labels", "iterative")
        assert Counter(tuple(s["json"]["labels"]) for split in ("train", "val") for s in found[split]) == pool
        assert [s["json"] for s in found["test"]] == [s["json"] for s in source["test"]]  # the test split untouched
        assert sorted(s["png" if "png" in s else "jpg"] for s in found["train"] + found["val"]) == sorted(
            s["png" if "png" in s else "jpg"] for split in ("train", "val") for s in source[split])
        vals.update(tuple(s["json"]["labels"]) for s in found["val"])
        rare.append(sum("rare" in s["json"]["labels"] for s in found["val"]))
    assert vals == pool  # each pooled sample validated once
    assert sorted(rare) == [1, 2]  # the 3 pooled positives of 'rare' over 2 folds
    summary = json.loads((tmp_path / "m_cv2" / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and len(summary["metrics"]["map_macro"]["per_fold"]) == 2


def test_cv_of_numbers_from_a_csv_end_to_end(tmp_path: Path) -> None:
    from pipeline.data.writer.shards import write_shards

    names = _images(tmp_path, 40)
    values = np.random.default_rng(2).lognormal(0.0, 1.0, (40, 2)).round(4)
    (tmp_path / "y.csv").write_text("".join(f"{p},{a};{b}\n" for p, (a, b) in zip(names, values)))
    manifest = write_shards(tmp_path / "y.csv", tmp_path / "shards", fractions=(0.6, 0.2, 0.2), show_progress=False,
                            task="regression")
    assert (manifest.classes, manifest.label_key, manifest.split_source) == (["target0", "target1"], "json.target",
                                                                               "binned")
    written = np.array([s["json"]["target"] for found in _samples(tmp_path / "shards").values() for s in found])
    assert sorted(map(tuple, written.tolist())) == sorted(map(tuple, values.tolist()))
    train = np.array([s["json"]["target"] for s in _samples(tmp_path / "shards")["train"]])
    assert manifest.split("train").targets["mean"] == pytest.approx(train.mean(axis=0).tolist())
    assert manifest.split("train").targets["std"] == pytest.approx(train.std(axis=0).tolist())
    run_cli(["cv", "configs/default.yaml", f"data.root={tmp_path / 'shards'}", "task.type=regression",
             "data.label_key=json.target", "cv.folds=2", *RUN, f"cv.data_dir={tmp_path / 'folds'}",
             f"run.output_dir={tmp_path}", "run.name=r"])
    for fold in range(2):
        folded = Manifest.read(tmp_path / "folds" / f"fold{fold}")
        targets = np.array([s["json"]["target"] for s in _samples(tmp_path / "folds" / f"fold{fold}")["train"]])
        assert len(targets) == 16 and folded.split("train").targets["mean"] == pytest.approx(
            targets.mean(axis=0).tolist())
    summary = json.loads((tmp_path / "r_cv2" / "cv_summary.json").read_text())
    assert {"mae", "rmse", "r2", "loss"} <= summary["metrics"].keys()
