"""The lean tar reader yields exactly what webdataset's tarfile_samples yields, for any sample range."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from webdataset.tariterators import tarfile_samples

from pipeline.data.io.tar import tar_samples


def _webdataset(path: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in tarfile_samples([{"url": str(path)}])]


def _ours(path: Path, start: int = 0, stop: int | None = None) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in tar_samples(str(path), start, stop)]


def test_same_samples_as_webdataset_on_our_shards(digits_root: Path) -> None:
    shards = sorted(digits_root.glob("train-*.tar"))[:3]
    for shard in shards:
        expected = _webdataset(shard)
        assert _ours(shard) == expected and len(expected) == 64
        assert _ours(shard, 10, 25) == expected[10:25]
        assert _ours(shard, 60) == expected[60:] and _ours(shard, 64) == []


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_prefixes_and_other_members(tmp_path: Path, format: int) -> None:
    path = tmp_path / "mixed.tar"
    deep = "d" * 90 + "/" + "e" * 60  # > 100 characters: ustar prefix, GNU long name or PAX path
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in ((f"{deep}/a.jpg", b"x" * 700), (f"{deep}/a.cls", b"1"), ("b.JPG", b""),
                           ("b.cls", b"2"), ("__meta__", b"skip"), ("c.seg.png", b"y" * 513)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
    ours = _ours(path)
    assert ours == _webdataset(path)
    assert [s["__key__"] for s in ours] == [f"{deep}/a", "b", "c"] and ours[1] == {"__key__": "b", "jpg": b"",
                                                                                   "cls": b"2"}
    assert ours[2]["seg.png"] == b"y" * 513


def test_a_cut_shard_fails_where_tarfile_fails(digits_root: Path, tmp_path: Path) -> None:
    shard = sorted(digits_root.glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = tar.getmember("00000010.png")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:member.offset_data + member.size // 2])
    for read in (lambda: list(tarfile_samples([{"url": str(cut)}])), lambda: list(tar_samples(str(cut)))):
        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            read()
    assert [s["__key__"] for s in _prefix(tar_samples(str(cut)))] == [f"{i:08d}" for i in range(10)]
    with pytest.raises(tarfile.ReadError):  # skipping past the cut (not reading it) fails too
        list(tar_samples(str(cut), 20))


def _prefix(samples) -> list[dict]:
    """The samples read before an error."""
    out = []
    try:
        for sample in samples:
            out.append(sample)
    except tarfile.ReadError:
        pass
    return out
