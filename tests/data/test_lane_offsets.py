"""A lane opens a shard at its first sample (pipeline.data.stream, rule 2): the shard index records each sample's byte
offset (`tar.placed_samples`), and the reader starts there, a seek locally and a `Range: bytes=N-` request over HTTP,
instead of walking (or downloading) the shard's earlier members. The batches stay exactly those of the walk; an
index written before offsets were recorded, and a server that ignores Range, still give them."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import build_stream
from pipeline.data.dataset.index import cache_path
from pipeline.data.dataset.resolve import spec_manifest
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.readahead import prefetch
from pipeline.data.io.remote import open_shard
from pipeline.data.io.tar import placed_samples, tar_samples
from tests.services.flaky_http import serve
from tests.support import wds_shards
from tests.support.codecs import KeyCodec


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, list[str]]:
    """Class-sorted digits (10 training shards of ~120 samples): 2 workers x 16 lanes start mostly inside shards."""
    return wds_shards.write_class_sorted(tmp_path_factory.mktemp("offsets") / "sorted")


def _samples(path: str, start: int = 0, at: int = 0) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in tar_samples(path, start, None, at=at)]


def test_a_shard_opened_at_a_samples_offset_reads_nothing_before_it(digits, tmp_path: Path) -> None:
    shard = digits["train"][0]
    placed = list(placed_samples(shard))
    offsets = [offset for offset, _ in placed]
    assert offsets[0] == 0 and offsets == sorted(set(offsets)) and len(offsets) > 100
    middle = len(offsets) // 2
    blanked = tmp_path / "blanked.tar"  # every byte before sample `middle` zeroed: a walk finds an empty tar there
    data = bytearray(Path(shard).read_bytes())
    data[:offsets[middle]] = bytes(offsets[middle])
    blanked.write_bytes(bytes(data))
    expected = _samples(shard, middle)
    assert _samples(str(blanked), middle, at=offsets[middle]) == expected and len(expected) == len(offsets) - middle
    assert _samples(str(blanked), middle) == []  # the walk would have read them
    assert [s["__key__"] for _, s in placed[middle:]] == [s["__key__"] for s in expected]


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_an_offset_includes_the_long_name_header_before_a_sample(tmp_path: Path, format: int) -> None:
    """A sample's offset is its first header's: a GNU long name or PAX header naming the member comes first."""
    path = tmp_path / "names.tar"
    deep = "d" * 90 + "/" + "e" * 60
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in ((f"{deep}/a.jpg", b"x" * 700), (f"{deep}/a.cls", b"1"), ("__meta__", b"skip"),
                           ("b.jpg", b"y"), ("b.cls", b"2"), (f"{deep}/c.jpg", b"z" * 600), ("d.jpg", b"w")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    offsets = [offset for offset, _ in placed_samples(str(path))]
    assert len(offsets) == 4
    for start, offset in enumerate(offsets):
        assert _samples(str(path), start, at=offset) == _samples(str(path), start)
    assert _samples(str(path), 2, at=offsets[2])[0]["__key__"] == f"{deep}/c"


def _config(paths: dict[str, list[str]], train: list[str], index_dir: Path):
    quoted = "[" + ",".join(f"'{p}'" for p in train) + "]"
    val = "[" + ",".join(f"'{p}'" for p in paths["val"]) + "]"
    return load_config("configs/default.yaml", [f"data.train={quoted}", f"data.val={val}",
                                                f"data.index_dir={index_dir}"])


def _epoch(cfg, epoch: int = 1) -> tuple[list[list[str]], object]:
    """(the rank's batches of `epoch` as `shard/key` lists, workers taken round-robin; the stream)."""
    stream = build_stream(cfg, spec_manifest(cfg.data, progress=False), "train", 0, 1, train=True, codec=KeyCodec())
    stream.set_position(epoch)
    workers = [stream.worker_batches(p) for p in range(stream.workers)]
    batches = []
    for worker in itertools.cycle(workers):
        batch = next(worker, None)
        if batch is None:
            return batches, stream
        batches.append(batch[0])


def _lane_starts(stream, epoch: int = 1) -> set[tuple[str, int]]:
    """(shard file name, byte offset) where the epoch's lanes open their shards."""
    plan = stream.plan(epoch)
    return {(Path(stream.shard_paths[s.shard]).name, stream._placed(s.shard, s.start))
            for lane in range(plan.num_lanes) for s in plan.segments(lane)}


def test_local_lanes_open_their_shards_at_their_first_sample(digits, tmp_path: Path, monkeypatch) -> None:
    from pipeline.data.io import tar

    local = _config(digits, digits["train"], tmp_path / "index")
    walked = _config(digits, digits["train"], tmp_path / "walked")  # its index as one written before offsets
    spec_manifest(local.data, progress=False)  # (indexing opens every shard at its start)
    _strip_offsets(walked)
    opened: list[tuple[str, int]] = []

    def spying(url: str, options=None, offset: int = 0):
        opened.append((Path(url).name, offset))
        return open_shard(url, options, offset)

    monkeypatch.setattr(tar, "open_shard", spying)
    expected, _ = _epoch(walked)
    assert {offset for _, offset in opened} == {0}  # without offsets: every shard walked from its start
    opened.clear()
    batches, stream = _epoch(local)
    assert batches == expected and len(batches) == 2 * 10  # 600 samples per worker: 9 batches of 64 + 24
    starts = _lane_starts(stream)
    assert set(opened) == starts and len([o for o in starts if o[1]]) >= 20  # most of the 32 lanes start inside


def _strip_offsets(cfg) -> None:
    """Make the cached index of data.train one written before offsets were recorded (no `offsets` field)."""
    from pipeline.data.dataset.resolve import sample_keys
    from pipeline.data.dataset.specs import expand

    spec_manifest(cfg.data, progress=False)  # indexes (cached)
    path = cache_path(cfg.data.index_dir, expand(cfg.data.train, "data.train", "train").urls, sample_keys(cfg.data))
    index = json.loads(path.read_text())
    for shard in index["shards"]:
        del shard["offsets"]
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("ranges", [True, False])
def test_http_lanes_transfer_only_from_their_first_sample_on(digits, tmp_path: Path, ranges: bool) -> None:
    """Over HTTP each lane asks its shard from its first sample's offset (`Range`), its read-ahead too; a server
    that ignores Range answers the whole shard (200) and the reader discards up to the offset: the same batches."""
    folder = Path(digits["train"][0]).parent
    expected, _ = _epoch(_config(digits, digits["train"], tmp_path / "local"))
    with serve(folder, ranges=ranges) as server:
        urls = [f"{server.url}/{Path(p).name}" for p in digits["train"]]
        cfg = _config(digits, urls, tmp_path / "index")
        spec_manifest(cfg.data, progress=False)  # indexed over HTTP (reads every shard whole once)
        server.log.clear()
        batches, stream = _epoch(cfg)
        gets = [e for e in server.gets() if e.name.endswith(".tar")]  # (not the class files looked for beside)
    assert batches == expected
    assert all(e.status == (206 if e.start else 200) for e in gets)
    sent = {(e.name, e.start) for e in gets}
    if ranges:
        assert sent == _lane_starts(stream)  # each lane from its first sample on, nothing earlier
    else:
        assert sent == {(Path(url).name, 0) for url in urls}  # whole shards: the reader discarded the heads


def test_a_read_ahead_at_an_offset_is_handed_over_only_there(digits) -> None:
    shard = Path(digits["train"][3])
    offsets = [offset for offset, _ in placed_samples(str(shard))]
    with serve(shard.parent) as server:
        url, options = f"{server.url}/{shard.name}", ReadOptions(prefetch_mb=1)
        prefetch(url, options, offset=offsets[40])
        with open_shard(url, options) as handle:  # another offset: a connection of its own
            assert handle.read(10) == shard.read_bytes()[:10]
        with open_shard(url, options, offsets[40]) as handle:
            assert handle.read() == shard.read_bytes()[offsets[40]:]
        starts = sorted(e.start for e in server.gets())
    assert starts == [0, offsets[40]]


def test_offsets_are_trusted_only_where_every_open_checks_the_shard() -> None:
    """An offset is used only for a shard with a version (pinned: an open of another version fails), never for
    `pipe:` output (no version) or a .tar.gz shard (no seeking into a gzip stream)."""
    from pipeline.data.dataset.index import ShardEntry

    offsets = [0, 1536, 4096]
    assert ShardEntry("/d/a.tar", 3, version="size=9 mtime_ns=1", offsets=offsets).trusted_offsets() == offsets
    assert ShardEntry("pipe:cat /d/a.tar", 3, offsets=offsets).trusted_offsets() == []
    assert ShardEntry("/d/a.tar.gz", 3, version="size=9 mtime_ns=1", offsets=offsets).trusted_offsets() == []


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory) -> Path:
    """A folder `pipeline data shards` wrote: 600 JPEGs, train 420 samples in 5 shards of at most 100."""
    from pipeline.data.writer.digits import write_digits_jpeg_imagefolder
    from pipeline.data.writer.shards import write_shards

    work = tmp_path_factory.mktemp("own")
    write_digits_jpeg_imagefolder(work / "images", 600, size=24)
    write_shards(work / "images", work / "shards", max_samples=100, show_progress=False)
    return work / "shards"


def _own_epoch(root: Path, spec: bool = False) -> tuple[list[list[str]], object]:
    from pipeline.data.dataset.resolve import dataset_manifest

    where = [f"data.train={root}", f"data.val={root}"] if spec else [f"data.root={root}"]
    cfg = load_config("configs/default.yaml", [*where, "data.mix_shards=16", "data.auto_prepare_digits=false"])
    stream = build_stream(cfg, dataset_manifest(cfg.data), "train", 0, 1, train=True, codec=KeyCodec())
    stream.set_position(1)
    workers = [stream.worker_batches(p) for p in range(stream.workers)]
    return [batch[0] for batch in itertools.chain.from_iterable(itertools.zip_longest(*workers)) if batch], stream


def test_our_writer_records_every_samples_offset_beside_the_manifest(own_folder: Path) -> None:
    from pipeline.data.dataset.manifest import OFFSETS_NAME, Manifest

    assert (own_folder / OFFSETS_NAME).is_file() and "offsets" not in (own_folder / "manifest.json").read_text()
    manifest = Manifest.read(own_folder, offsets=True)
    shards = [shard for split in manifest.splits.values() for shard in split.shards]
    plain = Manifest.read(own_folder)  # what commands that build no loader read: the sidecar is not parsed
    assert not any(shard.offsets for split in plain.splits.values() for shard in split.shards)
    assert len(shards) == 5 + 1 + 1 and sum(s.num_samples for s in shards) == 600
    for shard in shards:  # exactly where the reader finds each sample's first header
        assert shard.offsets == [offset for offset, _ in placed_samples(str(own_folder / shard.name))]


def test_lanes_open_our_shards_at_their_offsets_with_the_batches_of_the_walk(own_folder: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    import shutil

    from pipeline.data.dataset.manifest import OFFSETS_NAME
    from pipeline.data.io import tar

    walked = tmp_path / "walked"  # the same folder as written before offsets were recorded
    shutil.copytree(own_folder, walked)
    (walked / OFFSETS_NAME).unlink()
    opened: list[int] = []

    def spying(url: str, options=None, offset: int = 0):
        opened.append(offset)
        return open_shard(url, options, offset)

    monkeypatch.setattr(tar, "open_shard", spying)
    expected, stream = _own_epoch(walked)
    assert set(opened) == {0} and not any(len(o) for o in stream.sample_offsets)
    for spec in (False, True):  # data.root, and the folder named by data.train
        opened.clear()
        batches, stream = _own_epoch(own_folder, spec)
        names = lambda found: [[key.split("/", 1)[1] for key in batch] for batch in found]  # noqa: E731
        assert names(batches) == names(expected) and sum(map(len, batches)) == 420
        assert all(len(o) == n for o, n in zip(stream.sample_offsets, stream.shard_sizes))
        assert len([o for o in opened if o]) >= 20  # 2 workers x 16 lanes over 5 shards: most start inside one


def test_a_shard_changed_since_it_was_written_is_walked(own_folder: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.data.dataset.manifest import Manifest

    changed = tmp_path / "changed"
    shutil.copytree(own_folder, changed)
    first = Manifest.read(changed).split("train").shards[0].name
    with open(changed / first, "ab") as handle:  # another size: its offsets may no longer hold
        handle.write(bytes(1024))
    shards = Manifest.read(changed, offsets=True).split("train").shards
    assert shards[0].offsets == [] and all(len(s.offsets) == s.num_samples for s in shards[1:])
