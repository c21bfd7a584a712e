"""What a server (or a stranger's shard) serves is checked: a HEAD it refuses, an HTML page instead of a tar,
garbage, empty tars and repeated file names (every lost sample counted), 404s and failing servers while
indexing (exit 2 / 69), a shard that changes during a run (exit 65), a server that trickles (data.min_bytes_per_s),
and bombs: a .tar.gz with a 1.5 GB member (data.max_sample_mb, peak memory measured) and images over PIL's
pixel limit (training counts them, predict and visualize say one line)."""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest

from pipeline.config.schema import DataConfig  # noqa: E402
from pipeline.data.dataset.resolve import specs_manifest  # noqa: E402
from pipeline.data.io.counters import net_counters  # noqa: E402
from pipeline.data.io.handles import ReadOptions  # noqa: E402
from pipeline.data.io.remote import open_shard  # noqa: E402
from pipeline.data.io.stat import stat_shard  # noqa: E402
from pipeline.data.io.tar import BAD, NotATar, tar_samples  # noqa: E402
from pipeline.data.samples import faults  # noqa: E402
from pipeline.data.samples.faults import inspect_sample  # noqa: E402
from pipeline.data.samples.images import ImageTooLarge, open_image  # noqa: E402
from pipeline.data.stream import shard_slice  # noqa: E402
from pipeline.exits import NetworkError, ShardChanged  # noqa: E402
from tests.conftest import ROOT, TINY, read_jsonl, run_cli, run_main  # noqa: E402
from tests.services.flaky_http import HTML_PAGE, serve
from tests.support import wds_shards

FAST = ReadOptions(backoff_s=0.01, backoff_max_s=0.05, timeout_s=5)
TRAIN = [f"train-00000{i}.tar" for i in range(5)]  # 250, 250, 250, 250, 200 samples
BOMB_MIB = 1500


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The digits as foreign shards (jpg + cls): train 1,200 in 5 shards, val 300, test 297."""
    folder = tmp_path_factory.mktemp("served") / "shards"
    wds_shards.write(folder, "jpg+cls")
    return folder


def _delta(before: dict) -> dict:
    now = net_counters()
    return {k: now[k] - before[k] for k in now}


# ---- HEAD refused ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [501, 405, 403])
def test_stat_without_head_asks_the_first_byte(folder: Path, status: int) -> None:
    name = TRAIN[0]
    with serve(folder) as plain, serve(folder, head_status=status) as refusing:
        expected = stat_shard(f"{plain.url}/{name}", FAST)
        began = time.monotonic()
        assert stat_shard(f"{refusing.url}/{name}", FAST) == expected
        assert time.monotonic() - began < 1  # no retries: a refused HEAD is not a failure
        assert [(e.method, e.status) for e in refusing.log] == [("HEAD", status), ("GET", 206)]
    assert expected[0] == (folder / name).stat().st_size and expected[1].startswith('"')


# ---- not a tar: HTML, garbage, empty; repeated file names -----------------------------------------------------
def test_an_html_page_is_not_a_tar_with_its_content_type_and_first_bytes(folder: Path) -> None:
    with serve(folder, html=(TRAIN[1],)) as server:
        url = f"{server.url}/{TRAIN[1]}"
        with pytest.raises(NotATar) as caught:
            list(tar_samples(url, options=FAST))
        samples = list(shard_slice(url, 0, 3, FAST))
    assert str(caught.value) == f"not a tar file (content type text/html; charset=utf-8): it starts with " \
                                f"{HTML_PAGE[:48]!r}"
    assert [s["__key__"] for s in samples] == ["#0", "#1", "#2"]  # stand-ins, counted as truncated
    check = inspect_sample(samples[0], "RGB")
    assert check.reason == "truncated" and check.detail.startswith("NotATar: not a tar file (content type text/html")


def test_a_gzip_shard_that_is_not_gzip(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(HTML_PAGE)
    with pytest.raises(NotATar, match=r"^not a gzip file: it starts with b'<!DOCTYPE html>"):
        list(tar_samples(str(tmp_path / "x.tar.gz")))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_foreign_shards_lose_no_sample_uncounted(folder: Path, tmp_path: Path) -> None:
    """Garbage, an empty tar and a cut one count as lost samples (the mean whole shard, less what was read); a
    repeated file name loses one sample, not the rest of its shard (webdataset raises there): 201 read, 1 bad."""
    shards = tmp_path / "mixed"
    shards.mkdir()
    good = [(f"s{i:04d}.{ext}", data) for i in range(201) for ext, data in (("jpg", b"x"), ("cls", b"1"))]
    repeated = good[:297] + [("s0148.jpg", b"y")] + good[297:]  # s0148 gets a second jpg
    _tar(shards / "a-0.tar", repeated)
    _tar(shards / "a-1.tar", good)
    (shards / "a-2.tar").write_bytes(b"\x89garbage" * 300)
    _tar(shards / "a-3.tar", [])
    data = (shards / "a-1.tar").read_bytes()
    (shards / "a-4.tar").write_bytes(data[:len(data) // 2 + 100])  # cut inside a member, after about 100 samples
    read = list(tar_samples(str(shards / "a-0.tar")))
    assert len(read) == 201 and [s["__key__"] for s in read if BAD in s] == ["s0148"]
    assert read[148][BAD] == ("undecodable", "the file name s0148.jpg appears twice in the sample")
    cut = sum(1 for _ in shard_slice(str(shards / "a-4.tar"), 0, 201) if faults.MISSING not in _)
    manifest = specs_manifest({"train": [str(shards / "a-*.tar")], "val": [str(shards / "a-1.tar")]},
                              DataConfig(index_dir=str(tmp_path / "index"), classes=["0", "1"]), progress=False)
    counts = [s.num_samples for s in manifest.split("train").shards]
    assert counts == [201, 201, 201, 201, 201] and 90 < cut < 110  # a-2, a-3: 201 lost each; a-4: 201 - cut lost
    checks = [inspect_sample(s, "RGB", 2) for shard in manifest.split("train").shards
              for s in shard_slice(shard.name, 0, shard.num_samples)]
    assert sum(c.reason == "truncated" for c in checks) == 201 + 201 + (201 - cut)  # 2 whole shards and a-4's rest
    assert [c.key for c in checks if "appears twice" in c.detail] == ["s0148"]


# ---- bombs ----------------------------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width x height (grayscale) and holds one row: PIL reads only the header to open it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [30_000, 10_000])  # PIL raises above 2 x 89.5 M pixels, only warns above 89.5 M
def test_images_over_the_pixel_limit_are_oversize_samples(side: int) -> None:
    with pytest.raises(ImageTooLarge, match=rf"^the image has {side * side:,} pixels, over the 89,478,485 PIL "):
        open_image(io.BytesIO(_png_header(side, side)))
    check = inspect_sample({"__key__": "k", "__url__": "u", "png": _png_header(side, side), "cls": b"0"}, "RGB", 2)
    assert check.reason == "oversize" and check.detail.startswith(f"the image has {side * side:,} pixels")


def write_bomb(path: Path, mib: int = BOMB_MIB) -> None:
    """A .tar.gz of one sample: a `mib` MiB jpg of zeros (about 7 MB gzipped) and its cls."""
    size = mib << 20
    with gzip.open(path, "wb", compresslevel=1) as out:
        info = tarfile.TarInfo("bomb.jpg")
        info.size = size
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        zeros = bytes(16 << 20)
        for start in range(0, size, len(zeros)):
            out.write(zeros[:min(len(zeros), size - start)])
        label = tarfile.TarInfo("bomb.cls")
        label.size = 1
        out.write(label.tobuf(format=tarfile.USTAR_FORMAT) + b"0" + bytes(511) + bytes(1024))


def test_a_sample_over_max_sample_mb_is_skipped_unread(tmp_path: Path) -> None:
    write_bomb(tmp_path / "small.tar.gz", mib=70)
    (plain := tmp_path / "small.tar").write_bytes(gzip.decompress((tmp_path / "small.tar.gz").read_bytes()))
    for path in (tmp_path / "small.tar.gz", plain):
        [sample] = tar_samples(str(path))
        assert sample[BAD] == ("oversize", "its files hold 73.4 MB or more, over data.max_sample_mb=64; skipped unread")
        assert set(sample) == {"__key__", "__url__", BAD}
        [whole] = tar_samples(str(path), options=ReadOptions(max_sample_mb=100))
        assert len(whole["jpg"]) == 70 << 20 and whole["cls"] == b"0"


# ---- a slow server --------------------------------------------------------------------------------------------
def test_a_trickling_server_fails_like_a_timeout(folder: Path) -> None:
    """2 bytes a second never trips the idle timeout; under data.min_bytes_per_s over the window it is a failed
    attempt, retried and counted, then given up: never a hang."""
    options = ReadOptions(timeout_s=5, backoff_s=0.01, retries=2, min_bytes_per_s=1000, slow_window_s=1.0)
    before = net_counters()
    with serve(folder, trickle=(TRAIN[0],), trickle_bytes_per_s=20) as server:
        url = f"{server.url}/{TRAIN[0]}"
        began = time.monotonic()
        with pytest.raises(NetworkError) as caught:
            open_shard(url, options).read(10_000)
        elapsed = time.monotonic() - began
        samples = list(shard_slice(url, 0, 3, options))
    assert re.fullmatch(rf"network: {url}: gave up at byte \d+ after 2 retries; last error: slower than "
                        r"data.min_bytes_per_s=1000: \d+\.\d bytes/s over 1\.\d s", str(caught.value))
    assert 3 <= elapsed < 6  # 3 windows of 1 s (+ a read in progress each), not 10,000 / 20 = 500 s
    assert all(s[faults.MISSING].startswith("NetworkError: network: ") for s in samples)
    assert _delta(before) == {"retries": 4, "resumed": 4, "failed": 2}  # each retry resumed at the byte it had


def test_a_fast_server_is_never_slow(folder: Path) -> None:
    options = ReadOptions(timeout_s=5, min_bytes_per_s=1000, slow_window_s=0.001)
    with serve(folder) as server:
        assert len(list(tar_samples(f"{server.url}/{TRAIN[0]}", options=options))) == 250


# ---- a shard that changes -------------------------------------------------------------------------------------
def test_a_shard_that_changed_since_indexing_is_an_error_at_every_open(folder: Path, tmp_path: Path) -> None:
    """The index pins each shard's size and version; an open that gets another raises ShardChanged, through the
    stream too (never truncated samples of a mix), and the cache keeps one copy per version."""
    with serve(folder, swap={TRAIN[0]: (2, TRAIN[1])}) as server:
        url = f"{server.url}/{TRAIN[0]}"
        size, version = stat_shard(url, FAST)
        pinned = ReadOptions(backoff_s=0.01, pinned={url: (size, version)}, cache_dir=str(tmp_path / "cache"))
        assert len(list(shard_slice(url, 0, 250, pinned))) == 250  # GET 1 (read whole: cached)
        assert len(list(shard_slice(url, 0, 250, pinned))) == 250  # from the copy
        assert len(server.gets(TRAIN[0])) == 1
        moved = ReadOptions(backoff_s=0.01, pinned={url: (size, version)})
        assert len(list(shard_slice(url, 0, 250, moved))) == 250  # GET 2: still the indexed bytes
        with pytest.raises(ShardChanged) as caught:
            list(shard_slice(url, 0, 250, moved))  # GET 3: the other file's bytes
    assert str(caught.value).startswith(f"shard {url} changed since it was indexed (size {size} -> "
                                        f"{(folder / TRAIN[1]).stat().st_size}, version {version!r} -> ")
    local = folder / TRAIN[2]
    options = ReadOptions(pinned={str(local): stat_shard(str(local))})
    assert len(list(shard_slice(str(local), 0, 250, options))) == 250
    options.pinned[str(local)] = (local.stat().st_size, "size=1 mtime_ns=2")
    with pytest.raises(ShardChanged, match=r"version 'size=1 mtime_ns=2' -> 'size="):
        list(shard_slice(str(local), 0, 250, options))


# ---- end to end: `pipeline train` and `predict` -----------------------------------------------------------------
def _specs(url: str, train: list[str] = TRAIN) -> list[str]:
    quoted = ",".join(f"'{url}/{name}'" for name in train)
    return [f"data.train=[{quoted}]", f"data.val=['{url}/val-000000.tar','{url}/val-000001.tar']"]


def _train(out: Path, name: str, *extra: str, env: dict | None = None):
    """`pipeline train` with the default loader workers; (result, seconds)."""
    began = time.monotonic()
    result = run_cli(["train", "configs/default.yaml", f"data.index_dir={out / 'index'}", f"run.output_dir={out}",
                      f"run.name={name}", *TINY, "train.epochs=1", "data.retries=2",
                      *extra], check=False, env=env)
    return result, time.monotonic() - began


def _error_line(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


def test_an_html_shard_counts_against_max_bad_fraction(folder: Path, tmp_path: Path) -> None:
    """One of 5 training shards answers 200 with a login page: one warning naming what it is, its samples (the mean
    whole shard: 250) counted as truncated in data/train/skipped; over data.max_bad_fraction the run stops with 65."""
    with serve(folder, html=(TRAIN[4],)) as server:
        strict, strict_s = _train(tmp_path, "strict", *_specs(server.url), "train.log_every_steps=5")
        allowed, _ = _train(tmp_path, "allowed", *_specs(server.url), "data.max_bad_fraction=0.25")
    url = f"{server.url}/{TRAIN[4]}"
    print(f"html shard: exit {strict.returncode} after {strict_s:.1f} s")
    assert strict.returncode == 65 and strict_s < 240, strict.stderr[-3000:]  # (57 s at a load of 12 on 2 cores)
    assert f"warning: data.train: shard {url} could be read only up to sample 0 (NotATar: not a tar file (content " \
           "type text/html; charset=utf-8): it starts with b'<!DOCTYPE html>" in strict.stderr
    assert "counted as 250 lost sample(s) ('truncated', against data.max_bad_fraction)" in strict.stderr
    assert _error_line(strict).startswith("error: data.max_bad_fraction=0.01 cannot hold in epoch 1: ")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    [row] = [r for r in read_jsonl(tmp_path / "allowed" / "metrics.jsonl") if "data/train/seen" in r]
    assert (row["data/train/seen"], row["data/train/skipped"], row["data/train/skipped/truncated"]) == (1250, 250, 250)
    assert row["data/val/skipped"] == 0


def test_remote_failures_while_indexing_have_their_codes(folder: Path, tmp_path: Path) -> None:
    """A 404 is bad input (2, as a missing local file); a server that keeps failing (500) or trickles below
    data.min_bytes_per_s is remote data unavailable (69), after the retries; each one line, in seconds."""
    with serve(folder, always_fail=(TRAIN[1],), fail_status=500, trickle=(TRAIN[2],)) as server:
        missing, missing_s = _train(tmp_path, "missing", *_specs(server.url, [TRAIN[0], "nope.tar"]))
        failing, failing_s = _train(tmp_path, "failing", *_specs(server.url, [TRAIN[0], TRAIN[1]]))
        slow, slow_s = _train(tmp_path, "slow", *_specs(server.url, [TRAIN[0], TRAIN[2]]), "data.min_bytes_per_s=1000",
                              "data.slow_window_s=1")
    print(f"404: exit {missing.returncode} in {missing_s:.1f} s; 500: exit {failing.returncode} in {failing_s:.1f} s; "
          f"trickle: exit {slow.returncode} in {slow_s:.1f} s")
    assert (missing.returncode, failing.returncode, slow.returncode) == (2, 69, 69)
    assert _error_line(missing) == f"error: {server.url}/nope.tar: 404 Not Found"
    assert _error_line(failing) == (f"error: network: {server.url}/{TRAIN[1]}: gave up at byte 0 after 2 retries; "
                                    "last error: 500 Internal Server Error")
    assert re.fullmatch(rf"error: network: {server.url}/{TRAIN[2]}: gave up at byte \d+ after 2 retries; last error: "
                        r"slower than data.min_bytes_per_s=1000: \d+\.\d bytes/s over 1\.\d s", _error_line(slow))
    assert max(missing_s, failing_s, slow_s) < 90  # mostly start-up on a busy 2-core machine; trickle: 3 windows of 1 s


def test_a_shard_that_changes_during_the_run_stops_it_with_65(folder: Path, tmp_path: Path) -> None:
    """The server refuses HEAD (403, as to S3 presigned GET URLs): indexing asks a ranged GET instead and training
    runs. Once indexed (2 GETs), train-000000 is replaced on the server: the first epoch's open of it ends the run
    with one line naming both versions, instead of training on a mix."""
    with serve(folder, head_status=403, swap={TRAIN[0]: (2, TRAIN[1])}) as server:
        result, seconds = _train(tmp_path, "changed", *_specs(server.url))
    print(f"changed shard: exit {result.returncode} after {seconds:.1f} s")
    assert result.returncode == 65 and seconds < 240, result.stderr[-3000:]  # (97 s at a load of 12 on 2 cores)
    size, new = (folder / TRAIN[0]).stat().st_size, (folder / TRAIN[1]).stat().st_size
    assert _error_line(result).startswith(f"error: shard {server.url}/{TRAIN[0]} changed since it was indexed "
                                          f"(size {size} -> {new}, version '\"")
    assert not (tmp_path / "changed" / "checkpoints" / "last").exists()


@pytest.fixture(scope="module")
def bomb_run(folder: Path, tmp_path_factory) -> dict:
    """A run on the local training shards plus a .tar.gz of one 1,500 MiB sample (data.num_workers=0, so that every
    read is in the one process whose peak memory the parent measures)."""
    base = tmp_path_factory.mktemp("bomb")
    write_bomb(base / "bomb.tar.gz")
    runs = {}
    for name, extra in (("bomb", [str(base / "bomb.tar.gz")]), ("reference", [])):  # the same run without the bomb
        train = ",".join(f"'{path}'" for path in [*(folder / n for n in TRAIN), *extra])
        args = ["train", "configs/default.yaml", f"data.train=[{train}]", f"data.val=['{folder}/val-000000.tar']",
                f"data.index_dir={base / 'index'}", f"run.output_dir={base}", f"run.name={name}", *TINY,
                "train.epochs=1", "data.num_workers=0"]
        measure = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                                capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs[name] = {"result": result, "seconds": time.monotonic() - began,
                      "peak_mb": int(result.stdout.strip().splitlines()[-1]) / 1024}
    return {**runs["bomb"], "run": base / "bomb", "base": base, "reference_mb": runs["reference"]["peak_mb"]}


def test_a_gzip_bomb_costs_time_not_memory(bomb_run: dict) -> None:
    result = bomb_run["result"]
    print(f"bomb: exit {result.returncode} in {bomb_run['seconds']:.1f} s, peak RSS {bomb_run['peak_mb']:.0f} MB "
          f"for a {BOMB_MIB} MiB member; the same run without it: {bomb_run['reference_mb']:.0f} MB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert bomb_run["peak_mb"] - bomb_run["reference_mb"] < 100  # the member alone is 1,573 MB (it held 3 GB once)
    assert "skipping sample 'bomb' of shard bomb.tar.gz (oversize: its files hold 1572.9 MB or more, over " \
           "data.max_sample_mb=64; skipped unread)" in result.stderr
    [row] = [r for r in read_jsonl(bomb_run["run"] / "metrics.jsonl") if "data/train/seen" in r]
    assert (row["data/train/seen"], row["data/train/skipped"], row["data/train/skipped/oversize"]) == (1201, 1, 1)


@pytest.mark.parametrize("command", ["predict", "visualize"])
def test_predict_and_visualize_refuse_a_pixel_bomb_in_one_line(bomb_run: dict, command: str) -> None:
    image = bomb_run["base"] / "huge.png"
    image.write_bytes(_png_header(30_000, 30_000))
    args = [command, str(bomb_run["run"]), str(image)] if command == "predict" else \
        [command, str(bomb_run["run"]), "--layer", "features.1.0.0", "--image", str(image)]
    began = time.monotonic()
    result = run_cli(args, check=False) if command == "predict" else run_main(args)  # (the same check of the image)
    assert result.returncode == 2 and time.monotonic() - began < 60, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: '{image}': the image has 900,000,000 pixels, over the 89,478,485 PIL decodes "
        "(PIL.Image.MAX_IMAGE_PIXELS, its guard against decompression bombs)"]
