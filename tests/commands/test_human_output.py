"""Results for people: the table that ends training, the epoch line, the progress bar's throughput."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

from pipeline.run.summary import per_class_rows, print_training_summary
from pipeline.tracking.console import ImagesPerSecondColumn, epoch_line

METRICS = {"accuracy": 0.75, "precision_macro": 0.7, "recall_macro": 0.7166, "f1_macro": 0.68, "auroc": 0.9,
           "num_samples": 12, "num_skipped": 0, "confusion_matrix": [[4, 0, 0], [1, 2, 1], [0, 1, 3]]}


def _printed(fn, *args) -> str:
    out = io.StringIO()
    fn(*args, Console(file=out, width=100, highlight=False))
    return out.getvalue()


def test_training_summary_shows_the_headline_and_the_worst_classes() -> None:
    text = _printed(print_training_summary, METRICS, ["cat", "dog", "[fox]"])
    lines = [line.rstrip() for line in text.splitlines()]
    assert lines[:7] == ["test (best weights)", "accuracy           0.7500", "precision (macro)  0.7000",
                         "recall (macro)     0.7166", "F1 (macro)         0.6800", "AUROC              0.9000",
                         "samples            12"]
    assert "worst 3 of 3 classes (by F1)" in text
    rows = [line for line in lines if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["dog", "[fox]", "cat"]  # F1 0.571, 0.75, 0.889
    assert "│ dog   │     0.667 │  0.500 │ 0.571 │       4 │" in rows[0]


def test_per_class_rows_from_the_confusion_matrix() -> None:
    rows = per_class_rows([[4, 0, 0], [1, 2, 1], [0, 1, 3]], ["a", "b", "c"])
    assert [r["support"] for r in rows] == [4, 4, 4]
    assert (rows[0]["precision"], rows[0]["recall"]) == (0.8, 1.0) and rows[1]["recall"] == 0.5


def test_epoch_line_fits_one_terminal_row() -> None:
    record = {"epoch": 999, "train/loss": 9.3456, "val/loss": 9.25, "val/accuracy": 0.99999, "lr": 1.2345e-4,
              "images_per_second": 999999.4}
    line = epoch_line(record, 999, 9999.5, improved=True)
    assert line == ("epoch 999/999  loss 9.3456  val_loss 9.2500  val_acc 1.0000  lr 1.2e-04  999999 img/s  9999.5s"
                    "  best")
    assert len(line) <= 100
    assert epoch_line(record, 999, 9999.5, improved=True, width=100) == line
    assert epoch_line(record, 999, 9999.5, improved=True, width=90) == \
        "epoch 999/999  loss 9.3456  val_loss 9.2500  val_acc 1.0000  lr 1.2e-04  9999.5s  best"
    assert epoch_line(record, 999, 9999.5, improved=True, width=80) == \
        "epoch 999/999  loss 9.3456  val_loss 9.2500  val_acc 1.0000  9999.5s  best"


def test_progress_shows_images_per_second_from_the_step_rate() -> None:
    now = [0.0]
    progress = Progress(get_time=lambda: now[0], auto_refresh=False, disable=True)
    task = progress.add_task("epoch 1", total=100, images_per_step=64)
    for _ in range(10):
        now[0] += 0.5
        progress.advance(task)  # 2 steps/s
    assert ImagesPerSecondColumn().render(progress.tasks[0]).plain == "128 img/s"
    other = progress.add_task("epochs", total=3)
    assert ImagesPerSecondColumn().render(progress.tasks[other]).plain == ""


def test_data_shards_of_equal_classes_says_so_and_keeps_stderr_empty(tmp_path, capsys) -> None:
    from PIL import Image

    from pipeline.commands.cli import main

    for name in ("circle", "square"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            color = 20 * i + (0 if name == "circle" else 5)  # no two files alike (duplicates are warned of)
            Image.new("L", (8, 8), color=color).save(tmp_path / "src" / name / f"{i}.png")
    assert main(["data", "shards", str(tmp_path / "src"), str(tmp_path / "out"), "--split", "0.6,0.2,0.2"]) == 0
    result = capsys.readouterr()
    assert result.err == ""  # no progress bar (not a terminal), no blank lines
    lines = result.out.splitlines()
    assert "train: 12 samples, 2 classes; 6 per class (balanced)" in lines
    assert "val  : 4 samples, 2 classes; 2 per class (balanced)" in lines
    assert not any("smallest" in line for line in lines)


def test_cpu_threads_leave_a_core_to_each_loader_worker() -> None:
    from pipeline.training.threads import choose_threads

    # The quick start on 2 cores: 2 workers -> 1 thread (torch would take 2, oversubscribing with the workers).
    assert choose_threads("auto", 2, 1, cores=2, env={}) == (1, "auto: 2 cores - 2 loader workers")
    assert choose_threads("auto", 0, 1, cores=2, env={}) == (2, "auto: 2 cores - 0 loader workers")
    assert choose_threads("auto", 4, 2, cores=32, env={}) == (12, "auto: 32 cores / 2 ranks - 4 loader workers")
    assert choose_threads("auto", 8, 8, cores=16, env={})[0] == 1
    assert choose_threads("auto", 2, 1, cores=16, env={"OMP_NUM_THREADS": "3"}) == (3, "OMP_NUM_THREADS")
    assert choose_threads("6", 2, 1, cores=2, env={"OMP_NUM_THREADS": "3"}) == (6, "train.cpu_threads")


def test_cpu_threads_bad_values_are_one_line() -> None:
    from pipeline.config import load_config

    for bad in ("0", "many", "-1"):
        with pytest.raises(ValueError, match=r"^train.cpu_threads='.*' is not valid; give auto or a whole number"):
            load_config(None, [f"train.cpu_threads={bad}"])
    assert load_config(None, ["train.cpu_threads=3"]).train.cpu_threads == "3"


def test_reduced_precision_on_a_cpu_without_its_units_says_so_in_one_line(tmp_path: Path) -> None:
    from pipeline.training.threads import cpu_flags, cpu_precision_warning

    avx2 = {"fpu", "sse2", "avx", "avx2", "fma"}  # an AMD EPYC of the CI machines: bf16 autocast is emulated
    line = cpu_precision_warning("bf16", avx2)
    assert line.startswith("warning: train.precision=bf16 on a CPU without avx512_bf16 or amx_bf16: ")
    assert "train.precision=fp32 is faster on this machine" in line and "\n" not in line
    assert cpu_precision_warning("fp16", avx2).startswith("warning: train.precision=fp16 on a CPU without avx512_fp16")
    assert cpu_precision_warning("bf16", avx2 | {"amx_bf16"}) == ""
    assert cpu_precision_warning("bf16", avx2 | {"avx512_bf16"}) == ""
    assert cpu_precision_warning("fp32", avx2) == ""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) is None
