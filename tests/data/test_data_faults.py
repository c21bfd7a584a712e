"""Corrupt and odd data: exact skip counts, equal steps per rank, exact-once evaluation, resume, the
threshold, `pipeline data verify`, the writer's refusal of unreadable images, and the preflight checks."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import Manifest, build_loader
from pipeline.data.samples.faults import FIELDS, as_dict
from tests.conftest import TINY, read_jsonl, run_cli, run_main
from tests.support.faulty_shards import BAD_LABEL, NO_LABEL, UNDECODABLE, faulty_samples, random_png, write_set

GOOD = 40 - len(UNDECODABLE) - 2  # 35: the two RGBA images are converted and kept
NO_NETWORK = {"net_retries": 0, "net_resumed": 0, "net_failed": 0}  # local shards: no network events
EXPECTED = {"seen": 40, "truncated": 0, "undecodable": 3, "no_label": 1, "bad_label": 1, "oversize": 0,
            "converted_mode": 2, "converted_size": 0, **NO_NETWORK}


def truncate_inside(path: Path, member: str) -> None:
    """Cut a tar file in the middle of `member`'s data, as an interrupted copy would."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[:info.offset_data + info.size // 2])


@pytest.fixture(scope="module")
def faulty_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faulty") / "shards"
    write_set(root, faulty_samples())
    return root


@pytest.fixture(scope="module")
def truncated_root(tmp_path_factory) -> Path:
    """The faulty set with train shard 1 cut inside sample 16: samples 16..19 are lost (4 more skips)."""
    root = tmp_path_factory.mktemp("truncated") / "shards"
    write_set(root, faulty_samples())
    truncate_inside(root / "train-000001.tar", "00000016.png")
    return root


def _cfg(root: Path, *overrides: str):
    return load_config(None, [f"data.root={root}", "data.image_size=8", "train.batch_size=4",
                              "train.eval_batch_size=5", *overrides])


def _epoch(root: Path, split: str, world: int, workers: int, train: bool, epoch: int = 1, *overrides: str):
    """Run one epoch of `split` on every rank; (batches per rank, labels, fault counts summed over ranks)."""
    cfg = _cfg(root, f"data.num_workers={workers}", *overrides)
    manifest = Manifest.read(root)
    steps, labels, counts = [], [], torch.zeros(len(FIELDS), dtype=torch.int64)
    for rank in range(world):
        data = build_loader(cfg, manifest, split, rank, world, train=train)
        data.set_position(epoch)
        batches = list(data.loader)
        if train:
            assert len(batches) == data.stream.steps_per_epoch()
        steps.append(len(batches))
        labels += [int(y) for _, batch in batches for y in batch]
        counts += data.bad_samples.total
    return steps, labels, as_dict(counts)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2)])
def test_training_skips_are_counted_exactly_and_ranks_keep_equal_steps(faulty_root: Path, world: int,
                                                                        workers: int) -> None:
    steps, labels, counts = _epoch(faulty_root, "train", world, workers, train=True)
    assert counts == EXPECTED
    assert len(set(steps)) == 1  # every rank runs the same number of steps: no DDP hang
    assert steps[0] == (10 if world == 1 else 3 * 2)  # 40 / 4 per batch; or 10 per slot -> 3 batches x 2 workers
    assert len(labels) == 40 and set(labels) <= {0, 1, 2, 3}  # bad ones replaced by good samples of the shard


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2)])
def test_evaluation_counts_every_good_sample_once(faulty_root: Path, world: int, workers: int) -> None:
    _, labels, counts = _epoch(faulty_root, "val", world, workers, train=False)
    assert counts == EXPECTED
    assert len(labels) == GOOD == 35  # nothing duplicated to pad a rank, every good sample once
    good = [i % 4 for i in range(40) if i not in (*UNDECODABLE, NO_LABEL, BAD_LABEL)]
    assert sorted(labels) == sorted(good)


def test_truncated_shard_is_padded_to_the_manifest_count(truncated_root: Path) -> None:
    steps, labels, counts = _epoch(truncated_root, "train", 2, 2, train=True)
    # Undecodable sample 17 is among the four lost, so it now counts as truncated.
    assert counts == {**EXPECTED, "truncated": 4, "undecodable": 2}
    assert steps == [6, 6] and len(labels) == 40


@pytest.mark.parametrize("workers, start", [(0, 3), (2, 3), (2, 6)])
def test_restart_reproduces_batches_and_counts_with_bad_samples(truncated_root: Path, workers: int,
                                                                start: int) -> None:
    cfg = _cfg(truncated_root, f"data.num_workers={workers}", "data.augment.rotation=15")
    manifest = Manifest.read(truncated_root)
    full = build_loader(cfg, manifest, "train", 0, 1, train=True)
    full.set_position(2, 0)
    reference = list(full.dataloader)
    resumed = build_loader(cfg, manifest, "train", 0, 1, train=True)
    resumed.set_position(2, start)
    rest = list(resumed.dataloader)
    assert len(rest) == len(reference) - start == 10 - start
    for (a, la, ca), (b, lb, cb) in zip(reference[start:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ca, cb)
    assert as_dict(sum(c for _, _, c in reference)) == {**EXPECTED, "truncated": 4, "undecodable": 2}


def test_balanced_sampling_counts_labels_it_cannot_draw(truncated_root: Path) -> None:
    steps, labels, counts = _epoch(truncated_root, "train", 1, 0, True, 1, "imbalance.balanced_sampling=true")
    assert steps == [10] and len(labels) == 40
    # Never-drawn samples are counted once each; undecodable images are counted as often as they are drawn.
    assert (counts["truncated"], counts["no_label"], counts["bad_label"]) == (4, 1, 1)


def test_odd_sizes_and_gray_images_are_converted_not_skipped(tmp_path: Path) -> None:
    samples = [{"__key__": f"{i:08d}", "png": random_png(i), "cls": str(i % 4).encode()} for i in range(12)]
    samples[2]["png"] = random_png(2, "L")
    samples[5]["png"] = random_png(5, size=(20, 10))
    write_set(tmp_path / "odd", samples, shard_size=6)
    _, labels, counts = _epoch(tmp_path / "odd", "test", 1, 0, train=False)
    assert len(labels) == 12
    assert counts == {"seen": 12, "truncated": 0, "undecodable": 0, "no_label": 0, "bad_label": 0, "oversize": 0,
                      "converted_mode": 1, "converted_size": 1, **NO_NETWORK}


# ---- end to end: the CLI ------------------------------------------------------------------------

def _train_args(root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "configs/default.yaml", f"data.root={root}", f"run.output_dir={out}", f"run.name={name}",
            *TINY, "train.batch_size=4", "train.epochs=1", "data.num_workers=0", *extra]


def test_max_bad_fraction_stops_the_run_with_one_line(faulty_root: Path, tmp_path: Path) -> None:
    result = run_cli(_train_args(faulty_root, tmp_path, "strict", "data.max_bad_fraction=0.05"), check=False)
    assert result.returncode == 65
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data.max_bad_fraction=0.05 exceeded: 5 of 40 training samples (12.50%) were skipped in epoch 1 "
        "(undecodable 3, no_label 1, bad_label 1; converted: mode 2); find them with "
        f"`pipeline data verify {faulty_root}`, or raise data.max_bad_fraction")
    # The epoch is on record before the stop, with its counts.
    row = read_jsonl(tmp_path / "strict" / "metrics.jsonl")[-1]
    assert row["data/train/skipped"] == 5 and row["data/train/bad_fraction"] == 0.125
    assert "skipping sample '00000003' of shard val-000000.tar (undecodable: " in result.stderr


def test_max_bad_fraction_stops_mid_epoch_once_the_epoch_cannot_pass(faulty_root: Path, tmp_path: Path) -> None:
    # 5 of the 40 samples are bad; at 0.05 the epoch may skip 2. Checked at every step (log_every_steps=1).
    result = run_cli(_train_args(faulty_root, tmp_path, "early", "data.max_bad_fraction=0.05",
                                 "train.log_every_steps=1"), check=False)
    assert result.returncode == 65
    last = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: data.max_bad_fraction=0.05 cannot hold in epoch 1: 3 of its 40 training samples "
                         r"\(7.50%\) were already skipped by step (\d+) of 10 \((.*)\); find them with "
                         rf"`pipeline data verify {re.escape(str(faulty_root))}`, or raise data.max_bad_fraction", last)
    assert match, last
    assert int(match[1]) < 10 and not (tmp_path / "early" / "metrics.jsonl").exists()  # stopped inside the epoch
    # The counts it names are those of the first steps: each bad sample the stream met by then, by reason.
    reasons = match[2].split("; ")[0]  # e.g. 'undecodable 2, bad_label 1'
    assert sum(int(part.rsplit(" ", 1)[1]) for part in reasons.split(", ")) == 3


def test_bad_samples_are_reported_in_metrics_console_and_test_metrics(faulty_root: Path, tmp_path: Path) -> None:
    # Checked at every step too: 5 bad of 40 stay within 0.2, so nothing stops early.
    result = run_cli(_train_args(faulty_root, tmp_path, "r", "data.max_bad_fraction=0.2", "train.log_every_steps=1"))
    row = read_jsonl(tmp_path / "r" / "metrics.jsonl")[-1]
    for split in ("train", "val"):
        assert {k.rsplit("/", 1)[1]: row[k] for k in row if k.startswith(f"data/{split}/skipped/")} == \
            {"truncated": 0, "undecodable": 3, "no_label": 1, "bad_label": 1, "oversize": 0}
        assert row[f"data/{split}/converted/mode"] == 2 and row[f"data/{split}/seen"] == 40
    assert row["val/num_samples"] == 35
    test = json.loads((tmp_path / "r" / "test_metrics.json").read_text())
    assert test["num_samples"] == 35 and test["num_skipped"] == 5
    assert "data: 5 of 40 training samples skipped in epoch 1 (12.50%): undecodable 3, no_label 1, bad_label 1; " \
           "converted: mode 2" in result.stdout
    evaluated = json.loads(run_cli(["evaluate", str(tmp_path / "r"), "--json"]).stdout)
    assert evaluated["num_samples"] == 35 and evaluated["num_skipped"] == 5
    assert evaluated["confusion_matrix"] == test["confusion_matrix"]


def test_resume_mid_epoch_keeps_the_skip_counts(faulty_root: Path, tmp_path: Path) -> None:
    # 40 samples / 2 workers / 4 per batch = 10 steps; SIGKILL right after the checkpoint at step 6.
    args = _train_args(faulty_root, tmp_path, "cut", "data.max_bad_fraction=0.2", "checkpoint.every_steps=2",
                       "data.num_workers=2")
    killed = run_cli(args, check=False, env={"PIPELINE_KILL_AT_STEP": "6", "PIPELINE_KILL_AFTER_SAVE": "1"})
    assert killed.returncode == -9 and not (tmp_path / "cut" / "metrics.jsonl").exists()
    assert "resumed from" in run_cli(args).stdout
    # The counts of steps 1-6 come from the checkpoint's rank state, those of steps 7-10 from the resumed run.
    row = read_jsonl(tmp_path / "cut" / "metrics.jsonl")[0]
    assert {k: row[f"data/train/skipped/{k}"] for k in ("truncated", "undecodable", "no_label", "bad_label")} == \
        {"truncated": 0, "undecodable": 3, "no_label": 1, "bad_label": 1}
    assert row["data/train/seen"] == 40 and row["data/train/converted/mode"] == 2 and row["step"] == 10


@pytest.mark.distributed
@pytest.mark.slow  # ~30 s; the regular suite's test_two_ranks_stop_together_when_too_many_samples_are_bad sums too
def test_two_ranks_with_bad_samples_finish_with_summed_counts(truncated_root: Path, tmp_path: Path) -> None:
    result = run_cli(_train_args(truncated_root, tmp_path, "ddp", "data.max_bad_fraction=0.3", "train.epochs=2",
                                 "data.num_workers=2"), nproc=2, timeout=240)
    rows = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [6, 12]  # 40 samples / (2 ranks x 2 workers) -> 3 batches of <= 4 per worker
    for row in rows:
        assert {k: row[f"data/train/skipped/{k}"] for k in ("truncated", "undecodable", "no_label", "bad_label")} == \
            {"truncated": 4, "undecodable": 2, "no_label": 1, "bad_label": 1}
        assert sum(row["data/train/skipped_per_rank"]) == 8 and len(row["data/train/skipped_per_rank"]) == 2
        assert row["data/val/skipped"] == 5 and row["val/num_samples"] == 35  # val shards are intact
    assert "training samples skipped in epoch 2" in result.stdout


@pytest.mark.distributed
def test_two_ranks_stop_together_when_too_many_samples_are_bad(truncated_root: Path, tmp_path: Path) -> None:
    result = run_cli(_train_args(truncated_root, tmp_path, "stop", "train.epochs=3", "data.num_workers=2"),
                     nproc=2, timeout=120, check=False)
    assert result.returncode != 0 and "exitcode  : 65" in result.stderr  # both ranks: no hang, same decision
    assert result.stderr.count("error: data.max_bad_fraction=0.01 exceeded: 8 of 40 training samples (20.00%) "
                               "were skipped in epoch 1 (truncated 4, undecodable 2, no_label 1, bad_label 1; "
                               "converted: mode 2)") == 1
    assert [r["epoch"] for r in read_jsonl(tmp_path / "stop" / "metrics.jsonl")] == [1]


# ---- pipeline data verify -----------------------------------------------------------------------

def test_verify_passes_a_clean_set(tmp_path: Path) -> None:
    write_set(tmp_path / "clean", [{"__key__": f"{i:08d}", "png": random_png(i), "cls": str(i % 4).encode()}
                                   for i in range(16)], shard_size=8)
    result = run_cli(["data", "verify", str(tmp_path / "clean"), "--no-progress"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        "OK: 6 shard(s), 48 of 48 samples read, 0 bad (none) in 0 shard(s); converted on load: none")


def test_verify_names_the_bad_shards(truncated_root: Path) -> None:
    result = run_cli(["data", "verify", str(truncated_root), "--no-progress"], check=False)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    problems = [line for line in lines if line.startswith("problem: train ")]
    assert problems[0].startswith("problem: train shard train-000000.tar: 1 bad sample(s): 1 undecodable; "
                                  "first: 00000003 (undecodable: ")
    assert problems[1].startswith("problem: train shard train-000001.tar: size ")
    assert "sha256 differs" in problems[1] and "4 truncated" in problems[1] and "1 no_label" in problems[1]
    assert lines[-1] == ("PROBLEMS: 12 shard(s), 116 of 120 samples read, 18 bad (bad_label 3, no_label 3, "
                         "truncated 4, undecodable 8) in 12 shard(s); converted on load: mode 6")


def test_verify_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli(["data", "verify", str(tmp_path / "nowhere")], check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"error: shard folder '{tmp_path / 'nowhere'}' " \
                                                                "does not exist"
    (tmp_path / "empty").mkdir()
    result = run_cli(["data", "verify", str(tmp_path / "empty")], check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: no manifest.json in ")


# ---- the shard writer ---------------------------------------------------------------------------

def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    (root / "dog" / "broken.jpg").write_bytes(data[: len(data) * 2 // 3])  # headers intact, image data cut
    (root / "cat" / "empty.png").write_bytes(b"")
    return root


def test_writer_refuses_unreadable_images_naming_them(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "pets")
    result = run_cli(["data", "shards", str(src), str(tmp_path / "out")], check=False)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith(f"error: 2 of 14 image(s) in '{src}' cannot be decoded: ") and "\n" not in line
    assert f"{src}/cat/empty.png (UnidentifiedImageError" in line and f"{src}/dog/broken.jpg (OSError" in line
    assert line.endswith("fix or remove them, or pass --skip-bad")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_writer_skip_bad_leaves_them_out_and_lists_them(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "pets")
    result = run_cli(["data", "shards", str(src), str(tmp_path / "out"), "--skip-bad", "--split", "0.5,0.25,0.25"])
    manifest = Manifest.read(tmp_path / "out")
    assert sum(s.num_samples for s in manifest.splits.values()) == 12
    assert [line.split(":")[0] for line in manifest.skipped_sources] == [f"{src}/cat/empty.png",
                                                                          f"{src}/dog/broken.jpg"]
    assert manifest.image_mode == "RGB" and manifest.image_size == [8, 8]
    assert f"skipped (cannot be decoded): {src}/dog/broken.jpg: OSError" in result.stdout
    assert run_cli(["data", "verify", str(tmp_path / "out"), "--no-progress"]).returncode == 0


# ---- preflight: one line, exit 2, before any heavy work --------------------------------------------

def _one_class(root: Path) -> Path:
    write_set(root, [{"__key__": f"{i:08d}", "png": random_png(i), "cls": b"0"} for i in range(8)], classes=["only"])
    return root


IN_PROCESS = {"one_class", "batch", "drop_last", "output", "fp16"}
"""Preflight cases checked by `cli.main` in this process; no_folder and no_manifest (refused before torch is imported)
and missing_shard (after the process group forms, as the others) run as real processes."""


@pytest.mark.parametrize("case", ["no_folder", "no_manifest", "missing_shard", "one_class", "batch", "drop_last",
                                  "output", "fp16"])
def test_preflight_stops_bad_runs_with_one_line(faulty_root: Path, tmp_path: Path, case: str) -> None:
    root, extra = faulty_root, []
    if case == "no_folder":
        root = tmp_path / "nowhere"
        expected = (f"data.root='{root}' does not exist (the digits demo is built only at data/digits_shards or with "
                    f"data.auto_prepare_digits=true); build shards with `pipeline data shards SRC {root}`")
    elif case == "no_manifest":
        root = tmp_path / "empty"
        root.mkdir()
        expected = f"data.root='{root}' has no manifest.json; build shards there with `pipeline data shards SRC {root}`"
    elif case == "missing_shard":
        root = tmp_path / "copy"
        write_set(root, faulty_samples())
        (root / "val-000002.tar").unlink()
        expected = (f"data.root='{root}': 1 of 12 shard file(s) listed in manifest.json are missing (first: "
                    f"val-000002.tar); rebuild with `pipeline data shards` or check with `pipeline data verify {root}`")
    elif case == "one_class":
        root = _one_class(tmp_path / "one")
        expected = f"data.root='{root}': its manifest has 1 class(es) (only); a classifier needs at least 2"
    elif case == "batch":
        extra = ["train.batch_size=48"]
        expected = (f"train.batch_size=48 x 1 rank(s) x train.grad_accum_steps=1 = 48 samples per optimizer step, "
                    f"but data.root='{root}' has only 40 training samples; lower train.batch_size to at most 40")
    elif case == "drop_last":
        extra = ["train.batch_size=24", "data.drop_last=true", "data.num_workers=2"]
        expected = ("data.drop_last=true with train.batch_size=24 leaves no full batch: each of the 2 rank x worker "
                    "slot(s) reads 20 of the 40 training samples; lower train.batch_size or data.num_workers, "
                    "or set data.drop_last=false")
    elif case == "output":
        (tmp_path / "a_file").write_text("")
        extra = [f"run.output_dir={tmp_path / 'a_file'}"]
        expected = (f"run.output_dir='{tmp_path / 'a_file'}' is not writable: cannot create "
                    f"'{tmp_path / 'a_file' / 'p'}' (")
    else:
        extra = ["train.precision=fp16", "train.cpu=true"]  # no GPU on the machine gives the same check's twin
        expected = "train.precision=fp16 needs a GPU; use bf16 or fp32 with train.cpu=true"
    args = _train_args(root, tmp_path, "p", "data.auto_prepare_digits=false", *extra)
    result = run_main(args) if case in IN_PROCESS else run_cli(args, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {expected}")
    assert not (tmp_path / "p" / "config.yaml").exists()
