"""Validation samples that are training samples too are named (issue 26, item 7): per-sample fingerprints in the
shard index, one warning line per split in `pipeline train` (at start) and `pipeline data index`, none when the
splits are disjoint; our own shards by their manifest's duplicate_sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config.schema import DataConfig  # noqa: E402
from pipeline.data.dataset.index import INDEX_VERSION, cache_path, load_or_build  # noqa: E402
from pipeline.data.dataset.manifest import Manifest, SplitInfo  # noqa: E402
from pipeline.data.dataset.resolve import sample_keys, spec_manifest  # noqa: E402
from tests.conftest import TINY, run_cli  # noqa: E402
from tests.support import wds_shards

OVERLAP = ("warning: data.val: 100 of 200 samples are also in data.train (the same image bytes), e.g. 'd00100', "
           "'d00101', 'd00102'; val metrics on them measure memory, not generalisation")


def _write(path: Path, indices: range) -> None:
    """One foreign shard (webdataset's ShardWriter) of digits samples `indices`: key dNNNNN, a jpg, a cls."""
    import webdataset as wds
    from sklearn.datasets import load_digits

    digits = load_digits()
    with wds.TarWriter(str(path)) as sink:
        for i in indices:
            sink.write({"__key__": f"d{i:05d}", "jpg": wds_shards._image(digits.images[i], "jpg"),
                        "cls": int(digits.target[i])})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """train: samples 0-199; val: 100-299 (its first 100 are training samples, same keys and bytes); other: 200-399."""
    folder = tmp_path_factory.mktemp("overlap")
    _write(folder / "train.tar", range(0, 200))
    _write(folder / "val.tar", range(100, 300))
    _write(folder / "other.tar", range(200, 400))
    return folder


def _data(shards: Path, tmp_path: Path, val: str) -> DataConfig:
    return DataConfig(train=[str(shards / "train.tar")], val=[str(shards / val)], index_dir=str(tmp_path / "index"))


def _warnings(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines() if "samples are also in" in line]


def test_the_index_names_val_samples_that_are_training_samples(shards, tmp_path, capsys) -> None:
    spec_manifest(_data(shards, tmp_path, "val.tar"), progress=False, warn_shared=True)
    assert _warnings(capsys.readouterr().err) == [OVERLAP]
    spec_manifest(_data(shards, tmp_path, "other.tar"), progress=False, warn_shared=True)
    spec_manifest(_data(shards, tmp_path, "val.tar"), progress=False)  # the end-of-run summary does not repeat it
    assert _warnings(capsys.readouterr().err) == []


def test_data_index_warns_with_count_and_examples(shards, tmp_path) -> None:
    common = ["data", "index", str(shards / "train.tar"), "--index-dir", str(tmp_path / "index"), "--no-progress"]
    result = run_cli([*common, "--val", str(shards / "val.tar")], timeout=120)
    assert _warnings(result.stderr) == [OVERLAP.replace("data.val", "--val").replace("data.train", "the SPEC shards")]
    result = run_cli([*common, "--val", str(shards / "other.tar"), "--test", str(shards / "other.tar")], timeout=120)
    assert _warnings(result.stderr) == [] and "warning" not in result.stderr


def test_train_warns_at_start(shards, tmp_path) -> None:
    result = run_cli(["train", f"data.train={shards / 'train.tar'}", f"data.val={shards / 'val.tar'}",
                      f"data.index_dir={tmp_path / 'index'}", f"run.output_dir={tmp_path}", "run.name=r", *TINY,
                      "train.epochs=1"], timeout=300)
    assert _warnings(result.stderr) == [OVERLAP]
    assert (tmp_path / "r" / "test_metrics.json").is_file()


def test_an_index_of_the_former_version_is_rebuilt(shards, tmp_path) -> None:
    keys = sample_keys(DataConfig())
    urls = [str(shards / "train.tar")]
    old = cache_path(tmp_path, urls, keys)
    index = load_or_build(urls, keys, None, str(tmp_path), "data.train", progress=False)
    assert index.version == INDEX_VERSION == 2 and len(index.shards[0].fingerprints) == 200
    assert index.shards[0].keys[:2] == ["d00000", "d00001"] and len(set(index.shards[0].fingerprints)) > 190
    data = json.loads(old.read_text())
    data["version"] = 1
    for shard in data["shards"]:
        del shard["keys"], shard["fingerprints"]
    old.write_text(json.dumps(data))  # a version-1 cache where version 2 looks: read, refused, rebuilt
    assert load_or_build(urls, keys, None, str(tmp_path), "data.train", progress=False).shards[0].fingerprints


def test_our_manifest_names_sources_shared_with_train() -> None:
    groups = [{"sha256": "ab", "files": [{"path": "a/1.png", "class": "a", "split": "train"},
                                         {"path": "a/2.png", "class": "a", "split": "val"}]},
              {"sha256": "cd", "files": [{"path": "b/1.png", "class": "b", "split": "val"},
                                         {"path": "b/2.png", "class": "b", "split": "test"}]}]
    splits = {s: SplitInfo(n, {"a": n}) for s, n in (("train", 10), ("val", 4), ("test", 3))}
    shared = Manifest(classes=["a"], splits=splits, duplicate_sources=groups).shared_with_train()
    assert [s.line("val", "train") for s in shared] == [
        "val: 1 of 4 samples are also in train (the same image bytes), e.g. 'a/2.png' (train: 'a/1.png'); val "
        "metrics on them measure memory, not generalisation"]
    assert Manifest(["a"], splits).shared_with_train() == []
