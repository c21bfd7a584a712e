"""Shards read from anywhere (pipeline.data.io.remote): HTTP (Python's server and a flaky one), S3 (moto's server),
pipe:, .tar.gz, and the local cache; exact samples, exact network counters, bounded failure times."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.data.io.counters import net_counters
from pipeline.data.io.handles import ReadOptions
from pipeline.data.io.remote import open_shard
from pipeline.data.io.shard_cache import TEMP_PREFIX, cache_path
from pipeline.data.io.stat import stat_shard
from pipeline.data.io.tar import tar_samples
from pipeline.data.samples import faults
from pipeline.data.stream import shard_slice
from tests.services.flaky_http import serve, serve_static

SAMPLES, SHARDS = 40, 3
FAST = ReadOptions(backoff_s=0.001, backoff_max_s=0.01, timeout_s=5)
SLICES = [(0, None), (5, 17), (39, None), (40, None), (0, 1), (21, 40)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """3 shards of 40 samples written by webdataset's ShardWriter (random 2-8 kB 'jpg' + cls), ~230 kB each."""
    folder = tmp_path_factory.mktemp("remote_shards")
    rng = random.Random(0)
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=SAMPLES, verbose=0) as writer:
        for i in range(SAMPLES * SHARDS):
            writer.write({"__key__": f"{i:06d}", "jpg": rng.randbytes(rng.randint(2000, 8000)),
                          "cls": str(i % 7).encode()})
    return folder


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("train-*.tar"))


def read(url: str, start: int = 0, stop: int | None = None, options: ReadOptions | None = None) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in tar_samples(url, start, stop, options)]


def delta(before: dict) -> dict:
    now = net_counters()
    return {k: now[k] - before[k] for k in now}


def test_http_reads_exactly_the_local_samples(shard_dir: Path) -> None:
    with serve_static(shard_dir) as url:
        for name in names(shard_dir):
            for start, stop in SLICES:
                assert read(f"{url}/{name}", start, stop) == read(str(shard_dir / name), start, stop)
    assert len(read(str(shard_dir / name))) == SAMPLES


@pytest.mark.parametrize("ranges", [True, False])
def test_flaky_http_loses_and_duplicates_nothing_and_counts_exactly(shard_dir: Path, ranges: bool) -> None:
    before = net_counters()
    with serve(shard_dir, drop_every_bytes=60_000, fail_first_n=2, ranges=ranges) as server:
        for name in names(shard_dir):
            assert read(f"{server.url}/{name}", options=FAST) == read(str(shard_dir / name))
        assert read(f"{server.url}/{name}", 30, 35, FAST) == read(str(shard_dir / name), 30, 35)
    assert server.failures == 2 and server.noticed_drops >= 3 * SHARDS  # it really was flaky
    assert delta(before) == {"retries": server.failures + server.noticed_drops, "resumed": server.noticed_drops,
                             "failed": 0}
    for name in names(shard_dir):  # each re-connection continued where the cut was (Range) or from 0
        gets = [e for e in server.gets(name) if e.status in (200, 206)][:4]
        for previous, event in zip(gets, gets[1:]):
            assert event.start == (previous.start + previous.sent if ranges else 0)


def test_a_timeout_mid_shard_is_retried_and_resumed(shard_dir: Path) -> None:
    name, before = names(shard_dir)[0], net_counters()
    with serve(shard_dir, drop_every_bytes=100_000, stall_s=3) as server:
        began = time.monotonic()
        assert read(f"{server.url}/{name}", options=ReadOptions(timeout_s=0.3, backoff_s=0.01)) == \
            read(str(shard_dir / name))
        elapsed = time.monotonic() - began
    assert server.noticed_drops == 3 and elapsed < 2.5  # three stalls of 3 s, each cut short by the 0.3 s timeout
    assert delta(before) == {"retries": 3, "resumed": 3, "failed": 0}


def test_a_server_that_always_fails_ends_in_one_line_quickly(shard_dir: Path) -> None:
    name, before = names(shard_dir)[0], net_counters()
    with serve(shard_dir, always_fail=(name,)) as server:
        began = time.monotonic()
        with pytest.raises(OSError) as caught:
            read(f"{server.url}/{name}", options=ReadOptions(retries=3, backoff_s=0.05))
        elapsed = time.monotonic() - began
    assert str(caught.value) == (f"network: {server.url}/{name}: gave up at byte 0 after 3 retries; "
                                 f"last error: 503 Service Unavailable")
    assert len(server.gets(name)) == 4 and elapsed < 2  # 1 try + 3 retries, waiting 0.05 + 0.1 + 0.2 s (+-20%)
    assert delta(before) == {"retries": 3, "resumed": 0, "failed": 1}


def test_a_shard_given_up_mid_way_becomes_counted_truncated_samples(shard_dir: Path) -> None:
    """shard_slice keeps the slice's length: what the network could not deliver is stand-ins that say so."""
    name = names(shard_dir)[0]
    with serve(shard_dir, drop_every_bytes=60_000) as server:
        url, samples = f"{server.url}/{name}", []
        for sample in shard_slice(url, 0, SAMPLES, FAST):
            samples.append(sample)
            if len(samples) == 3:  # the open connection will be cut at byte 60000; every re-connection fails
                server.always_fail = (name,)
    missing = [s for s in samples if faults.MISSING in s]
    assert len(samples) == SAMPLES and 3 < len(missing) < SAMPLES - 3
    assert samples[SAMPLES - len(missing)]["__key__"] == f"#{SAMPLES - len(missing)}"
    assert missing[0][faults.MISSING].startswith(f"NetworkError: network: {url}: gave up at byte 60000 after 5 retries")


def test_not_found_fails_at_once_with_one_line(shard_dir: Path) -> None:
    before = net_counters()
    with serve(shard_dir) as server:
        with pytest.raises(OSError, match=r"^http://127\.0\.0\.1:\d+/nope\.tar: 404 Not Found$"):
            open_shard(f"{server.url}/nope.tar", FAST)
        assert len(server.gets()) == 1
    assert delta(before) == {"retries": 0, "resumed": 0, "failed": 1}
    with pytest.raises(OSError, match="Connection refused"):  # nobody listens there: retried, then one line
        open_shard(f"{server.url}/x.tar", ReadOptions(retries=1, backoff_s=0.01))


def test_stat_shard_local_and_http(shard_dir: Path, tmp_path: Path) -> None:
    name = names(shard_dir)[0]
    size = (shard_dir / name).stat().st_size
    copy = tmp_path / name
    shutil.copy(shard_dir / name, copy)
    with serve(tmp_path) as server:
        first = stat_shard(f"{server.url}/{name}")
        assert first[0] == size and first[1].startswith('"')
        local = stat_shard(str(copy))
        os.utime(copy, ns=(1, 1))
        assert stat_shard(f"{server.url}/{name}")[1] != first[1] and stat_shard(str(copy))[1] != local[1]
    assert local[0] == size and stat_shard(f"pipe:cat {copy}") == (None, "")


def test_pipe_and_file_urls(shard_dir: Path) -> None:
    path = shard_dir / names(shard_dir)[1]
    for start, stop in SLICES:
        expected = read(str(path), start, stop)
        assert read(f"pipe:cat {path}", start, stop) == expected == read(f"file://{path}", start, stop)
    with pytest.raises(OSError, match=r"^pipe:cat /no/such\.tar: the command exited with status 1 after 0 bytes"):
        read("pipe:cat /no/such.tar")
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):  # a cut stream, noticed while skipping
        read(f"pipe:head -c 50000 {path}", 30)


def test_tar_gz_shards_local_and_over_http(shard_dir: Path, tmp_path: Path) -> None:
    plain = shard_dir / names(shard_dir)[0]
    packed = tmp_path / "train-000000.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "cut.tgz").write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with serve(tmp_path, drop_every_bytes=40_000) as server:
        for start, stop in SLICES:
            expected = read(str(plain), start, stop)
            assert read(str(packed), start, stop) == expected == read(f"{server.url}/{packed.name}", start, stop, FAST)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        read(str(tmp_path / "cut.tgz"))


def test_cache_serves_later_reads_and_evicts_the_least_recently_used(shard_dir: Path, tmp_path: Path) -> None:
    shards = names(shard_dir)
    size = (shard_dir / shards[0]).stat().st_size
    options = ReadOptions(cache_dir=str(tmp_path / "cache"), cache_max_gb=2.5 * size / 1e9, backoff_s=0.001)
    with serve(shard_dir) as server:
        url = f"{server.url}/{shards[0]}"
        assert read(url, 0, 5, options) == read(str(shard_dir / shards[0]), 0, 5)
        assert not any((tmp_path / "cache").iterdir())  # stopped early: no copy, no half file
        assert read(url, 35, None, options) == read(str(shard_dir / shards[0]), 35)  # read to the end: kept
        assert read(url, 0, None, options) == read(str(shard_dir / shards[0]))  # from the copy
        assert len(server.gets(shards[0])) == 2
        assert cache_path(url, options.cache_dir).read_bytes() == (shard_dir / shards[0]).read_bytes()
        for name in shards[1:]:  # the third copy pushes the cache over 2.5 shards: the first goes
            time.sleep(0.01)  # distinct mtimes
            read(f"{server.url}/{name}", 0, None, options)
        kept = sorted(p.name for p in (tmp_path / "cache").iterdir())
        assert kept == sorted(cache_path(f"{server.url}/{n}", options.cache_dir).name for n in shards[1:])
        assert not any(p.name.startswith(TEMP_PREFIX) for p in (tmp_path / "cache").iterdir())
        read(url, 0, None, options)
        assert len(server.gets(shards[0])) == 3  # evicted, so fetched again


def _moto():
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto[server] and boto3 are needed for the S3 test ({exc}); pip install -e '.[dev]'")
    return boto3, ThreadedMotoServer


def test_s3_through_an_endpoint_override(shard_dir: Path, monkeypatch) -> None:
    boto3, ThreadedMotoServer = _moto()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://%s:%d" % server.get_host_and_port()
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="shards")
        for name in names(shard_dir):
            client.upload_file(str(shard_dir / name), "shards", f"train/{name}")
        options = ReadOptions(endpoint_url=endpoint, backoff_s=0.01)
        for name in names(shard_dir):
            for start, stop in SLICES[:3]:
                expected = read(str(shard_dir / name), start, stop)
                assert read(f"s3://shards/train/{name}", start, stop, options) == expected
        size, tag = stat_shard(f"s3://shards/train/{name}", options)
        assert size == (shard_dir / name).stat().st_size and tag
        with pytest.raises(OSError, match=r"^s3://shards/train/missing\.tar: FileNotFoundError"):
            open_shard("s3://shards/train/missing.tar", options)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the standard variable works too
        assert len(read(f"s3://shards/train/{name}", 0, None, ReadOptions())) == SAMPLES
    finally:
        server.stop()


# ---- through the stream: counters travel with the batches, from worker processes too ---------------

@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """2 shards of 24 8x8 PNGs (4 classes)."""
    import io

    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("remote_images")
    with wds.ShardWriter(str(folder / "train-%06d.tar"), maxcount=24, verbose=0) as writer:
        for i in range(48):
            buffer = io.BytesIO()
            pixels = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buffer, format="PNG")
            writer.write({"__key__": f"{i:06d}", "png": buffer.getvalue(), "cls": str(i % 4).encode()})
    return folder


def _evaluate(urls: list[str], workers: int, options: ReadOptions) -> tuple[list[int], dict]:
    from pipeline.config import load_config
    from pipeline.data.samples.decode import build_decoding
    from pipeline.data.stream import ShardStream, make_loader

    cfg = load_config(None, ["data.image_size=8"])
    stream = ShardStream(urls, [24] * len(urls), batch_size=5, codec=build_decoding(cfg.data, False)[0], channels=3,
                         rank=0, world_size=1, num_workers=workers, seed=0, train=False, read_options=options)
    stream.set_position(0)
    labels, counts = [], faults.empty_counts()
    for _, batch_labels, batch_counts in make_loader(stream, workers, False, "fork"):
        labels += batch_labels.tolist()
        counts += batch_counts
    return labels, faults.as_dict(counts)


@pytest.mark.parametrize("workers", [0, 2])
def test_network_counts_arrive_with_the_batches(image_dir: Path, workers: int) -> None:
    with serve(image_dir, drop_every_bytes=9_000, fail_first_n=1) as server:
        urls = [f"{server.url}/{n}" for n in names(image_dir)]
        labels, counts = _evaluate(urls, workers, FAST)
    assert sorted(labels) == sorted(i % 4 for i in range(48)) and counts["seen"] == 48  # every sample once
    assert faults.num_skipped(torch_counts(counts)) == 0
    drops = server.noticed_drops
    assert drops >= 10 and (counts["net_retries"], counts["net_resumed"], counts["net_failed"]) == (drops + 1, drops, 0)
    line = faults.summary_line(torch_counts(counts), "test")
    assert line == f"data: 0 of 48 test samples skipped (0.00%): none; network: {drops + 1} retries, {drops} resumed " \
                   "mid-shard"


def test_a_lost_shard_is_counted_truncated_and_given_up(image_dir: Path) -> None:
    first, second = names(image_dir)
    with serve(image_dir, always_fail=(second,)) as server:
        labels, counts = _evaluate([f"{server.url}/{first}", f"{server.url}/{second}"], 0,
                                   ReadOptions(retries=2, backoff_s=0.001))
    assert labels == [i % 4 for i in range(24)]
    assert (counts["seen"], counts["truncated"], counts["net_retries"], counts["net_failed"]) == (48, 24, 2, 1)
    assert faults.describe(torch_counts(counts)) == "truncated 24; network: 2 retries, 1 shard given up"
    record = faults.counts_record(torch_counts(counts), "val")
    assert (record["data/val/skipped"], record["data/val/net_retries"], record["data/val/net_failed"]) == (24, 2, 1)


def test_object_store_errors_are_one_line() -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is None:  # not a dependency; where it is installed this would go online
        with pytest.raises(OSError, match=r"^gs://bucket/a\.tar: .*gcsfs"):
            open_shard("gs://bucket/a.tar", FAST)
    with pytest.raises(OSError, match=r"^nosuchproto://x/a\.tar: "):
        open_shard("nosuchproto://x/a.tar", FAST)


def torch_counts(values: dict):
    import torch

    return torch.tensor([values[f] for f in faults.FIELDS])


def test_a_long_skip_over_http_is_a_range_request_not_a_download(tmp_path: Path) -> None:
    """Skipping a member larger than http.SEEK_BY_RANGE (4 MiB) is a Range request where the server allows it,
    else it is read through (smaller members are always read through: a round trip costs more)."""
    with wds.TarWriter(str(tmp_path / "big.tar")) as writer:
        for i in range(6):
            writer.write({"__key__": f"{i:03d}", "bin": bytes([i]) * (5 << 20), "cls": b"0"})
    expected = read(str(tmp_path / "big.tar"), 4)
    for ranges in (True, False):
        with serve(tmp_path, ranges=ranges) as server:
            assert read(f"{server.url}/big.tar", 4, None, FAST) == expected
        gets = server.gets()
        assert len(gets) == (5 if ranges else 1)  # the first connection, then a jump over each of samples 0-3
        starts = [e.start for e in gets]
        assert starts == sorted(starts) and (starts[-1] >= 4 * (5 << 20) if ranges else starts == [0])


# ---- read-ahead of the next shard -----------------------------------------------------------------------------
def test_a_prefetched_shard_is_read_ahead_then_handed_over_on_one_connection(shard_dir: Path) -> None:
    from pipeline.data.io import readahead

    name = names(shard_dir)[0]
    size = (shard_dir / name).stat().st_size
    expected = read(str(shard_dir / name))
    for limit_mb in (size * 2 / 1e6, size / 3 / 1e6):  # the whole shard ahead, or only its first third
        with serve(shard_dir) as server:
            url = f"{server.url}/{name}"
            readahead.prefetch(url, ReadOptions(prefetch_mb=limit_mb))
            deadline = time.time() + 10
            while sum(e.sent for e in server.gets(name)) < min(size, int(limit_mb * 1e6)) and time.time() < deadline:
                time.sleep(0.01)  # nobody reads yet: the thread does
            assert sum(e.sent for e in server.gets(name)) >= min(size, int(limit_mb * 1e6))
            assert read(url) == expected and len(server.gets(name)) == 1  # handed over: no second request
            assert url not in readahead._PREFETCHED


def test_the_stream_opens_a_slots_next_shard_while_reading_the_current_one(image_dir: Path) -> None:
    from pipeline.config import load_config
    from pipeline.data.samples.decode import build_decoding
    from pipeline.data.stream import ShardStream

    urls = sorted(p.name for p in image_dir.glob("*.tar"))
    codec = build_decoding(load_config(None, ["data.image_size=8"]).data, False)[0]
    with serve(image_dir) as server:
        stream = ShardStream([f"{server.url}/{u}" for u in urls], [24] * len(urls), batch_size=4, codec=codec,
                             channels=3, rank=0, world_size=1, num_workers=0, seed=0, train=False,
                             read_options=ReadOptions(backoff_s=0.01))
        samples = stream._slot_samples(0, 0, 0)
        next(samples)  # the first sample of the first shard
        deadline = time.time() + 10
        while not server.gets(urls[1]) and time.time() < deadline:
            time.sleep(0.01)
        assert len(server.gets(urls[1])) == 1  # the next shard is requested long before it is needed
        assert sum(1 for _ in samples) + 1 == 48
        assert all(len(server.gets(u)) == 1 for u in urls)  # each shard read once, over one connection
