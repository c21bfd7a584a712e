"""Shards named as another split's: `pipeline data index` over a folder of train-, val- and test- shards, and
training whose data.train holds val and test shards, say so (they count them as one set otherwise)."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.dataset.specs import named_splits, other_splits_line, several_splits_line
from tests.conftest import TINY, run_cli
from tests.support import wds_shards


def test_split_words_in_shard_names():
    urls = ["d/train-000000.tar", "http://h/x/val-000001.tar", "s3://b/cifar_test_2.tar.gz", "d/shard-3.tar",
            "d/pretrain.tar", "d/validation.tar"]
    assert named_splits(urls) == {"train": ["train-000000.tar"], "val": ["val-000001.tar", "validation.tar"],
                                  "test": ["cifar_test_2.tar.gz"]}
    assert other_splits_line("train", ["d/train-0.tar", "d/shard-1.tar"]) is None
    assert other_splits_line("val", ["d/train-0.tar", "d/val-0.tar"]) == (
        "data.val: 1 of its 2 shard(s) are named as train shards (e.g. train-0.tar); if they are, val is mixed with "
        "them: give each split only its own shards (e.g. data.val='DIR/val-*.tar')")
    assert several_splits_line(["d/train-0.tar", "d/train-1.tar"]) is None
    assert several_splits_line(["d/train-0.tar", "d/val-0.tar", "d/test-0.tar"]).startswith(
        "these shards are named as several splits (train: 1, val: 1, test: 1)")


def test_index_and_train_warn_about_a_folder_of_every_split(tmp_path: Path):
    folder = tmp_path / "shards"
    wds_shards.write(folder, "jpg+cls", per_shard=400)  # train-00000{0,1,2}, val-000000, test-000000
    index = run_cli(["data", "index", str(folder), "--index-dir", str(tmp_path / "index")])
    assert "these shards are named as several splits (train: 3, val: 1, test: 1)" in index.stderr
    train = run_cli(["train", f"data.train={folder}", f"data.val={folder}/val-000000.tar",
                     f"data.index_dir={tmp_path / 'index'}", "train.epochs=1", f"run.output_dir={tmp_path}",
                     "run.name=mixed", *TINY])
    assert "data.train: 2 of its 5 shard(s) are named as val / test shards (e.g. val-000000.tar)" in train.stderr
    assert "data.val: 1 of" not in train.stderr  # val holds only val shards: no name warning for it
    # ...and the overlap check sees what this costs: every val sample is a training sample too.
    assert "data.val: 300 of 300 samples are also in data.train (the same image bytes)" in train.stderr
