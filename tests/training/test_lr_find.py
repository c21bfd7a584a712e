"""`pipeline lr-find`: the sweep's lrs, smoothing, stop and suggestion rules (exact), the command on real digits
(plot, record, the line to paste, nothing of a run touched), its one-line errors, and two ranks agreeing."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from pipeline.training.lr_finder import (
    RULES,
    Sweep,
    bottom_index,
    run_sweep,
    smooth,
    steepest_index,
    sweep_lrs,
    valley_index,
)
from tests.conftest import TINY, run_cli, run_main
from tests.support.run_folders import snapshot


def test_lrs_grow_exponentially_from_start_to_end():
    lrs = sweep_lrs(1e-4, 1.0, 11)
    assert lrs[0] == 1e-4 and lrs[-1] == pytest.approx(1.0, rel=1e-12) and len(lrs) == 11
    assert all(b / a == pytest.approx(10 ** 0.4) for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("args, message", [
    ((1e-3, 1e-4, 100), "must be finite with 0 < start < end"),
    ((0.0, 1.0, 100), "must be finite with 0 < start < end"),
    ((1e-7, 10.0, 5), "--steps 5 is too few"),
])
def test_bad_sweep_arguments_are_one_line(args, message):
    with pytest.raises(ValueError, match=message):
        sweep_lrs(*args)


def test_smoothing_is_the_bias_corrected_moving_average():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no bias towards 0 at the start
    first, second = smooth([1.0, 3.0], beta=0.5)
    assert (first, second) == (1.0, pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / 0.75))


def test_valley_and_steepest_rules():
    # Flat, then falling over indices 3..13, then rising: the longest decreasing run has 12 points (one flat one,
    # then 3..13); fastai counts it from 13 - 12 = 1 and goes int(12 / 3) + int(12 / 6) = 4 + 2 points in.
    losses = [5.0, 5.0, 5.0] + [4.9 - 0.4 * i for i in range(11)] + [2.0, 3.0, 6.0]
    assert valley_index(losses) == 1 + 4 + 2
    assert steepest_index([3.0, 3.0, 2.9, 2.0, 1.0, 0.9, 0.9, 2.0, 3.0, 3.0]) == 3  # (1.0 - 2.9) / 2: the steepest


def test_bottom_rule_is_the_last_new_low_before_the_lr_grows_4x_without_one():
    lrs = [2.0 ** i for i in range(12)]  # each step doubles the lr: 4x = two steps
    # From index 1: new lows at 2, 3 and 5 (index 4 is higher, 6 and 7 too, and lrs[7] = 4 x lrs[5]: stop); the
    # lower loss at index 9 comes after the stop (the second descent of SGD with batch norm is not followed).
    losses = [5.0, 4.0, 3.0, 2.0, 2.5, 1.9, 2.2, 2.4, 2.0, 1.0, 6.0, 7.0]
    assert bottom_index(losses, lrs, start=1) == 5
    assert bottom_index(losses, lrs, start=1, patience=100.0) == 9
    sweep = Sweep(lrs=lrs, losses=losses, smoothed=losses)
    record = Sweep(lrs=lrs, losses=losses, smoothed=losses, rule="bottom").record()
    assert sweep.suggestion == sweep.valley and record["suggestion"] == record["bottom"] == lrs[bottom_index(
        losses, lrs, valley_index(losses))]
    assert RULES == {"sgd": "bottom", "adam": "valley", "adamw": "valley", "rmsprop": "valley"}


def test_sweep_stops_when_the_smoothed_loss_diverges_or_a_loss_is_not_finite():
    lrs = sweep_lrs(1e-3, 1.0, 30)
    diverging = run_sweep(lambda lr: 1.0 if lr < 0.1 else 1e3, lrs)
    first_high = next(i for i, lr in enumerate(lrs) if lr >= 0.1)
    assert len(diverging.lrs) == first_high + 1 and diverging.stopped.startswith("the smoothed loss passed 4x")
    nan = run_sweep(lambda lr: 1.0 if lr < 0.1 else math.nan, lrs)
    assert len(nan.lrs) == first_high and nan.stopped == f"a non-finite loss at lr {lrs[first_high]:.3g}"
    with pytest.raises(ValueError, match="the sweep stopped after 1 step"):
        run_sweep(lambda lr: 1.0 if lr == lrs[0] else math.inf, lrs)


ARGS = ["configs/default.yaml", *TINY, "data.num_workers=0"]
FLAGS = ["--steps", "30", "--start-lr", "1e-5", "--end-lr", "10"]


def test_lr_find_writes_the_plot_and_record_prints_the_line_and_leaves_the_run_alone(tmp_path, digits_root):
    out = tmp_path / "runs"
    common = [f"data.root={digits_root}", f"run.output_dir={out}", "run.name=r"]
    run_cli(["train", "configs/default.yaml", *common, *TINY, "data.num_workers=0", "train.epochs=1"])
    before = snapshot(out / "r")
    result = run_cli(["lr-find", *ARGS, *common, *FLAGS])
    lines = result.stdout.strip().splitlines()
    record = json.loads((out / "r.lr_find.json").read_text())
    assert lines[-1] == f"optim.lr={record['suggestion']:.3g}" and float(lines[-1].split("=")[1]) > 0
    assert lines[-2] == f"plot: {out / 'r.lr_find.png'} (record: {out / 'r.lr_find.json'})"
    assert (out / "r.lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(record["lrs"]) == len(record["losses"]) == len(record["smoothed"]) <= 30
    assert record["lrs"][0] == 1e-5 and record["suggestion"] in record["lrs"]
    assert record["rule"] == "valley" and record["suggestion"] == record["valley"]  # adamw: fastai's rule
    assert snapshot(out / "r") == before  # the run folder: not one byte changed
    assert sorted(p.name for p in out.iterdir()) == ["r", "r.lr_find.json", "r.lr_find.png"]


def test_lr_find_without_a_run_creates_no_run_folder_and_honours_out(tmp_path, digits_root):
    result = run_cli(["lr-find", *ARGS, f"data.root={digits_root}", f"run.output_dir={tmp_path}/runs", "optim.name=sgd",
                      *FLAGS, "--out", str(tmp_path / "plots" / "sweep.png")])
    assert re.fullmatch(r"optim\.lr=[0-9.e+-]+", result.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["sweep.json", "sweep.png"]
    record = json.loads((tmp_path / "plots" / "sweep.json").read_text())  # SGD: Smith's one-cycle peak
    assert record["rule"] == "bottom" and record["suggestion"] == record["bottom"] >= record["valley"]
    assert "(bottom of the smoothed loss, Smith's one-cycle peak for SGD)" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "3"], "error: lr-find: --steps 3 is too few for a curve; give at least 10 (100 is usual)"),
    (["--out", "x.jpg"], "error: --out 'x.jpg' must name a .png file (its .json record goes beside it)"),
    (["optim.lr=-1"], "error: optim.lr=-1.0 is out of range; it must be > 0.0"),
])
def test_lr_find_errors_are_one_line_with_exit_2(tmp_path, digits_root, extra, message):
    args = ["lr-find", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={tmp_path}", *extra]
    result = run_main(args) if "--out" in extra else run_cli(args, check=False)  # (--out: checked after torch loads)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [message]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.distributed
def test_two_ranks_agree_and_write_one_plot(tmp_path, digits_root):
    result = run_cli(["lr-find", *ARGS, f"data.root={digits_root}", f"run.output_dir={tmp_path}", *FLAGS], nproc=2,
                     timeout=600)
    record = json.loads((tmp_path / "digits.lr_find.json").read_text())
    assert result.stdout.strip().splitlines()[-1] == f"optim.lr={record['suggestion']:.3g}"
    assert result.stdout.count("optim.lr=") == 1 and "batch 32 x 2 rank(s)" in result.stdout
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["digits.lr_find.json", "digits.lr_find.png"]
