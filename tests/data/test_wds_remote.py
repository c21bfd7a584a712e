"""Training end to end on remote WebDataset shards: a flaky HTTP server, Python's own, pipe:, S3 (moto), .tar.gz.

The reference trains on local copies of the same shards. A remote run that is killed mid-epoch and
resumed must end with bit-identical weights and the same test metrics: the transport (with its
retries and mid-shard resumptions) must neither lose nor duplicate a sample, and exact resume must
hold over streams as it does over files.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, read_jsonl, run_cli  # noqa: E402
from tests.services.flaky_http import serve, serve_static
from tests.support import wds_shards

TRAIN = "train-{000000..000004}.tar"
COMMON = ("train.epochs=2", "checkpoint.every_steps=10")  # 38 steps per epoch at batch 32
KILL = {"PIPELINE_KILL_AT_STEP": "20", "PIPELINE_KILL_AFTER_SAVE": "1"}


def _quoted(items: list[str]) -> str:
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def _train(out: Path, name: str, train: list[str], val: list[str], test: list[str], *extra: str, **kwargs):
    args = ["train", "configs/default.yaml", f"data.train={_quoted(train)}", f"data.val={_quoted(val)}",
            f"data.test={_quoted(test)}", f"data.index_dir={out / 'index'}", "data.retries=8",
            f"run.output_dir={out}", f"run.name={name}", *TINY, *COMMON, *extra]
    return run_cli(args, **kwargs)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(str(p / "checkpoints/best/model.safetensors")) for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _test_metrics(run: Path) -> dict:
    return json.loads((run / "test_metrics.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The shards (jpg + cls), and a reference run on local files: brace pattern, glob, two files."""
    base = tmp_path_factory.mktemp("remote")
    folder = base / "shards"
    wds_shards.write(folder, "jpg+cls")
    tests = [str(folder / "test-000000.tar"), str(folder / "test-000001.tar")]
    _train(base, "ref", [str(folder / TRAIN)], [str(folder / "val-*.tar")], tests)
    return {"base": base, "folder": folder, "ref": base / "ref"}


def _kill_and_resume(out: Path, name: str, *specs: list[str], between=lambda: None) -> str:
    killed = _train(out, name, *specs, check=False, env=KILL)
    assert killed.returncode == -9, killed.stderr[-2000:]
    between()
    resumed = _train(out, name, *specs)
    assert "resumed from" in resumed.stdout
    return resumed.stdout + resumed.stderr


def test_flaky_http_train_http_val_pipe_test_resume_bit_exact(world: dict, tmp_path: Path) -> None:
    """Train from a server that cuts connections every 200 kB and answers its first 3 requests 503, validate from
    Python's own HTTP server (no Range support), test through `pipe:cat`; killed at step 20, resumed."""
    folder = world["folder"]
    with serve(folder, drop_every_bytes=200_000, fail_first_n=3) as flaky, serve_static(folder) as static:
        specs = ([f"{flaky.url}/{TRAIN}"], [f"{static}/val-000000.tar", f"{static}/val-000001.tar"],
                 [f"pipe:cat {folder}/test-00000{{0,1}}.tar"])
        def fresh_faults() -> None:  # the first run's indexing met every cut once: let training meet them again
            flaky.log.clear()
            flaky.dropped_at.clear()

        _kill_and_resume(tmp_path, "cut", *specs, between=fresh_faults)
        failures, noticed = flaky.failures, flaky.noticed_drops
        assert failures >= 1 and noticed >= 1
    run = tmp_path / "cut"
    assert _same_weights(world["ref"], run)
    assert _test_metrics(run) == _test_metrics(world["ref"]) and _test_metrics(run)["num_samples"] == 297
    rows = read_jsonl(run / "metrics.jsonl")
    retried = sum(r.get("data/train/net_retries", 0) for r in rows)
    resumed = sum(r.get("data/train/net_resumed", 0) for r in rows)
    print(f"flaky server: {failures} answered 503, {noticed} cuts noticed; metrics: {retried} retries, "
          f"{resumed} resumed")
    # Every retry was a 503 answered or a cut connection resumed; the server's 'noticed' also counts a cut past the
    # bytes an epoch needed that a later epoch's fresh read happens to follow, so it bounds the resumptions.
    assert retried == failures + resumed and 0 < resumed <= noticed
    assert all(r["data/train/skipped"] == 0 for r in rows)
    assert all(r["data/train/seen"] == 1200 - 1200 % 2 for r in rows)  # every sample of every epoch (2 slots)


@pytest.mark.slow  # S3 reading itself is in the regular suite (tests/data/test_remote.py)
def test_s3_train_targz_val_own_folder_test_resume_bit_exact(world: dict, digits_root: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Train from S3 (moto's server on 127.0.0.1, AWS_ENDPOINT_URL), validate on gzipped shards, test on one of our
    own shard folders; killed at step 20, resumed: the weights equal the local reference's."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto[server] and boto3 are needed for the S3 test ({exc}); pip install -e '.[dev]'")
    folder = world["folder"]
    for name in ("val-000000.tar", "val-000001.tar"):
        with open(folder / name, "rb") as src, gzip.open(tmp_path / f"{name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://%s:%d" % server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                              aws_secret_access_key="testing")
        client.create_bucket(Bucket="data")
        for shard in sorted(folder.glob("train-*.tar")):
            client.upload_file(str(shard), "data", f"digits/{shard.name}")
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        specs = ([f"s3://data/digits/{TRAIN}"], [str(tmp_path / "val-*.tar.gz")], [str(digits_root)])
        _kill_and_resume(tmp_path, "cut", *specs)
    finally:
        server.stop()
    run = tmp_path / "cut"
    assert _same_weights(world["ref"], run)
    metrics = _test_metrics(run)
    assert metrics["num_samples"] == 270 and sum(map(sum, metrics["confusion_matrix"])) == 270  # digits_root's test
