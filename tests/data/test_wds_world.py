"""Foreign WebDataset shards: specs, label keys, class names, the index and its cache, training end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config  # noqa: E402
from pipeline.config.schema import DataConfig  # noqa: E402
from pipeline.data.dataset import index as index_module  # noqa: E402
from pipeline.data.dataset.keys import SampleKeys  # noqa: E402
from pipeline.data.dataset.resolve import spec_manifest  # noqa: E402
from pipeline.data.dataset.specs import SpecError, expand  # noqa: E402
from tests.conftest import TINY, run_cli  # noqa: E402
from tests.support import wds_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wds")
    return {form: (wds_shards.write(base / form.replace("+", "_"), form), base / form.replace("+", "_"))[1]
            for form in ("jpg+cls", "jpg+json", "png+txt")}


def _data(folder: Path, tmp_path: Path, **extra) -> DataConfig:
    suffix = extra.pop("suffix", ".tar")
    return DataConfig(train=[str(folder / f"train-{{000000..000004}}{suffix}")], val=[str(folder / f"val-*{suffix}")],
                      test=[str(folder / f"test-000000{suffix}"), str(folder / f"test-000001{suffix}")],
                      index_dir=str(tmp_path / "index"), **extra)


# ---- specs -------------------------------------------------------------------------------------------------------
def test_specs_expand_braces_globs_folders_and_keep_urls(shards: dict[str, Path]) -> None:
    folder = shards["jpg+cls"]
    braces = expand(str(folder / "train-{000000..000004}.tar"), "data.train", "train").urls
    assert braces == [str(folder / f"train-{i:06d}.tar") for i in range(5)]
    assert expand(str(folder / "train-*.tar"), "data.train", "train").urls == braces
    assert len(expand(str(folder), "data.train", "train").urls) == 5 + 2 + 2  # every shard in the folder, sorted
    urls = ["http://127.0.0.1:1/a-{0..2}.tar", "pipe:cat /x/{a,b}.tar", "s3://bucket/k.tar"]
    assert expand(urls, "data.train", "train").urls == [
        "http://127.0.0.1:1/a-0.tar", "http://127.0.0.1:1/a-1.tar", "http://127.0.0.1:1/a-2.tar",
        "pipe:cat /x/a.tar", "pipe:cat /x/b.tar", "s3://bucket/k.tar"]


@pytest.mark.parametrize("spec, message", [
    ("train-{000000..000009}.tar", "5 of the 10 shards '{folder}/train-{000000..000009}.tar' names do not exist "
                                   "(first: {folder}/train-000005.tar)"),
    ("train-000009.tar", "'{folder}/train-000009.tar' does not exist"),
    ("nothing-*.tar", "matches no shard file"),
    (["train-000000.tar", "train-00000{0,1}.tar"], "names the shard"),
])
def test_bad_specs_are_one_line_errors(shards: dict[str, Path], spec, message) -> None:
    folder = shards["jpg+cls"]
    spec = [str(folder / s) for s in spec] if isinstance(spec, list) else str(folder / spec)
    with pytest.raises(SpecError) as err:
        expand(spec, "data.train", "train")
    assert message.replace("{folder}", str(folder)) in str(err.value)
    assert "\n" not in str(err.value) and str(err.value).startswith("data.train")


def test_a_string_spec_from_the_command_line_becomes_a_list() -> None:
    cfg = load_config(None, ["data.train=/d/train-{000000..000146}.tar", "data.val=[/d/v0.tar,/d/v1.tar]",
                             "data.label_key=json.annotation.label"])
    assert cfg.data.train == ["/d/train-{000000..000146}.tar"] and cfg.data.val == ["/d/v0.tar", "/d/v1.tar"]
    from pipeline.config.loader import ConfigError

    with pytest.raises(ConfigError, match="data.label_key='json' is not a sample key"):
        load_config(None, ["data.label_key=json"])


# ---- labels ------------------------------------------------------------------------------------------------------
def test_label_keys_read_cls_txt_and_nested_json() -> None:
    sample = {"cls": b"3", "txt": b"cat\n", "json": b'{"a": {"label": 2, "name": "dog"}}', "jpg": b""}
    assert SampleKeys().label(sample, 10) == (3, "", "")
    assert SampleKeys(label_key="txt", classes=("cat", "dog")).label(sample, 2) == (0, "", "")
    assert SampleKeys(label_key="json.a.label").label(sample, 10) == (2, "", "")
    assert SampleKeys(label_key="json.a.name", classes=("cat", "dog")).label(sample, 2) == (1, "", "")
    assert SampleKeys(label_key="json.a.missing").label(sample, 2)[1:] == ("no_label",
                                                                         "its json has no field 'a.missing'")
    assert SampleKeys(label_key="txt", classes=("ant", "bee")).label(sample, 2)[1] == "bad_label"
    assert SampleKeys().label({"jpg": b""}, 10)[1:] == ("no_label", "no 'cls' label (keys: jpg)")
    assert SampleKeys().label(sample, 3)[1] == "bad_label"


# ---- the index and the manifest ----------------------------------------------------------------------------------
@pytest.mark.parametrize("form, label_key, classes", [
    ("jpg+cls", "cls", [str(i) for i in range(10)]),
    ("jpg+json", "json.annotation.label", [str(i) for i in range(10)]),
    ("png+txt", "txt", sorted(wds_shards.NAMES)),
])
def test_manifest_of_foreign_shards_counts_every_sample_and_class(shards, tmp_path, form, label_key, classes) -> None:
    manifest = spec_manifest(_data(shards[form], tmp_path, label_key=label_key), progress=False)
    assert manifest.classes == classes
    expected = {"train": 1200, "val": 300, "test": 297}
    for split, n in expected.items():
        info = manifest.split(split)
        assert info.num_samples == n and sum(info.class_counts.values()) == n
        assert all(os.path.isabs(s.name) for s in info.shards)
    assert [s.num_samples for s in manifest.split("train").shards] == [250, 250, 250, 250, 200]


def test_the_index_is_cached_and_rebuilt_when_a_shard_changes(shards, tmp_path, monkeypatch) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(shards["jpg+cls"], folder)
    data = _data(folder, tmp_path)
    spec_manifest(data, progress=False)
    reads = []
    original = index_module.index_shard
    monkeypatch.setattr(index_module, "index_shard", lambda url, *a, **k: reads.append(url) or original(url, *a, **k))
    spec_manifest(data, progress=False)
    assert reads == []  # every split's index came from the cache
    shard = folder / "val-000001.tar"
    shard.write_bytes(shard.read_bytes())  # same bytes, newer mtime: the version differs
    os.utime(shard, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    spec_manifest(data, progress=False)
    assert reads == [str(folder / "val-000000.tar"), str(shard)]  # only the changed spec was read again


def test_classes_txt_beside_the_shards_names_the_classes(shards, tmp_path) -> None:
    import shutil

    folder = tmp_path / "named"
    shutil.copytree(shards["jpg+cls"], folder)
    (folder / "classes.txt").write_text("\n".join(wds_shards.NAMES) + "\n")
    assert spec_manifest(_data(folder, tmp_path), progress=False).classes == list(wds_shards.NAMES)
    given = _data(folder, tmp_path, classes=[str(tmp_path / "mine.txt")])
    (tmp_path / "mine.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    assert spec_manifest(given, progress=False).classes == [f"c{i}" for i in range(10)]


def test_a_wrong_label_key_names_the_keys_the_samples_have(shards, tmp_path) -> None:
    with pytest.raises(SpecError, match=r"no sample has a label under data.label_key='cls' \(the samples' keys: "
                                        r"jpg, json\); set data.label_key"):
        spec_manifest(_data(shards["jpg+json"], tmp_path), progress=False)


# ---- training end to end -----------------------------------------------------------------------------------------
def _train(data: DataConfig, out: Path, name: str, *extra: str, **kwargs):
    quoted = lambda items: "[" + ",".join(f"'{i}'" for i in items) + "]"  # noqa: E731 - braces inside [ ] need quotes
    specs = [f"data.train={quoted(data.train)}", f"data.val={quoted(data.val)}", f"data.test={quoted(data.test)}",
             f"data.index_dir={data.index_dir}", f"data.label_key={data.label_key}"]
    return run_cli(["train", "configs/default.yaml", *specs, f"run.output_dir={out}", f"run.name={name}", *TINY,
                    *extra], **kwargs)


def test_training_on_json_labelled_shards_evaluates_every_test_sample(shards, tmp_path) -> None:
    data = _data(shards["jpg+json"], tmp_path, label_key="json.annotation.label")
    _train(data, tmp_path, "json", "train.epochs=4", "data.num_workers=0")
    metrics = json.loads((tmp_path / "json" / "test_metrics.json").read_text())
    assert metrics["num_samples"] == 297 and sum(map(sum, metrics["confusion_matrix"])) == 297
    assert metrics["accuracy"] > 0.5


@pytest.mark.slow
def test_resume_mid_epoch_on_foreign_shards_is_bit_identical(shards, tmp_path) -> None:
    """Default workers (2, forkserver): killed right after the mid-epoch checkpoint at step 20 of 38, resumed.
    (slow: tests/data/test_wds_remote.py proves the same on remote foreign shards in the regular suite.)"""
    data = _data(shards["png+txt"], tmp_path, label_key="txt")
    common = ("train.epochs=2", "checkpoint.every_steps=10")
    _train(data, tmp_path, "ref", *common)
    killed = _train(data, tmp_path, "cut", *common, check=False,
                    env={"PIPELINE_KILL_AT_STEP": "20", "PIPELINE_KILL_AFTER_SAVE": "1"})
    assert killed.returncode == -9
    assert "resumed from" in _train(data, tmp_path, "cut", *common).stdout
    ref, cut = (load_file(str(tmp_path / r / "checkpoints/best/model.safetensors")) for r in ("ref", "cut"))
    assert ref.keys() == cut.keys() and all(torch.equal(ref[k], cut[k]) for k in ref)
    tests = [json.loads((tmp_path / r / "test_metrics.json").read_text()) for r in ("ref", "cut")]
    assert tests[0] == tests[1] and tests[0]["num_samples"] == 297


def test_cv_folds_of_foreign_shards_read_their_labels(shards, tmp_path) -> None:
    from pipeline.commands.cv import write_fold_shards
    from pipeline.data.dataset.manifest import Manifest

    data = _data(shards["png+txt"], tmp_path, label_key="txt")
    cfg = load_config(None, [f"data.train={data.train[0]}", f"data.val={data.val[0]}", f"data.test={data.test[0]}",
                             f"data.index_dir={data.index_dir}", "data.label_key=txt", "cv.folds=5"])
    fold = Manifest.read(write_fold_shards(cfg, 0, tmp_path / "fold0"))
    assert fold.classes == sorted(wds_shards.NAMES)
    assert fold.split("train").num_samples + fold.split("val").num_samples == 1500
    assert fold.split("val").num_samples == 300 and fold.split("test").num_samples == 250  # test-000000.tar only


def test_data_root_at_foreign_shards_points_to_data_train(shards, tmp_path) -> None:
    folder = shards["jpg+cls"]
    for root, says in ((folder, "has no manifest.json but 9 shard file(s) (test-000000.tar, ...): name them with "
                                "data.train=... data.val=..."),
                       (folder / "train-000000.tar", "names shards, not one of our folders")):
        result = run_cli(["train", f"data.root={root}", f"run.output_dir={tmp_path / 'runs'}", *TINY], check=False)
        assert result.returncode == 2 and says in result.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "runs").exists()
