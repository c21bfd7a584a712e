"""End-to-end runs of the real CLI on the digits shards (tiny model, a few seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.training.losses import build_loss
from pipeline.training.schedulers import warmup_cosine
from tests.conftest import TINY, read_jsonl, run_cli

TEST_KEYS = {"accuracy", "precision_macro", "recall_macro", "f1_macro", "auroc", "confusion_matrix", "num_samples",
             "loss", "num_skipped", "skipped", "weights", "tta"}


def _args(digits_root: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={out}", f"run.name={name}",
            "data.num_workers=0", *TINY, *extra]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def three_epochs(digits_root: Path, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted 3-epoch run (its folder, its stdout with --json): the contract's and the resume's reference."""
    out = tmp_path_factory.mktemp("three_epochs")
    result = run_cli([*_args(digits_root, out, "ref", "train.epochs=3"), "--json"])
    return out / "ref", result.stdout


def test_train_writes_the_run_folder_contract(three_epochs: tuple[Path, str]) -> None:
    run, stdout = three_epochs
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").train.epochs == 3
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"epoch", "step", "lr", "train/loss", "val/loss", "val/accuracy"} <= rows[0].keys()
    assert rows[-1]["step"] == 3 * 40  # 1257 samples / 32 per batch, no samples dropped with one slot
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics) == TEST_KEYS and metrics["num_samples"] == 270
    assert (metrics["weights"], metrics["tta"]) == ("model", "none")  # EMA and TTA are off by default
    assert sum(map(sum, metrics["confusion_matrix"])) == 270
    assert (run / "checkpoints" / "best" / "COMPLETE").is_file()
    assert (run / "checkpoints" / "last").resolve().name == "step-00000120"
    assert json.loads(stdout.strip().splitlines()[-1])["test"]["num_samples"] == 270
    evaluated = json.loads(run_cli(["evaluate", str(run), "--json"]).stdout)
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"])


def test_resume_at_epoch_boundary_is_bit_identical(digits_root: Path, tmp_path: Path,
                                                   three_epochs: tuple[Path, str]) -> None:
    ref, _ = three_epochs  # the same run (the run name and --json change nothing the comparison sees)
    # Killed (SIGKILL) right after the checkpoint at the end of epoch 2 (step 80), then resumed.
    killed = run_cli(_args(digits_root, tmp_path, "cut", "train.epochs=3"), check=False,
                     env={"PIPELINE_KILL_AT_STEP": "80", "PIPELINE_KILL_AFTER_SAVE": "1"})
    assert killed.returncode == -9
    assert [r["epoch"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1, 2]
    resumed = run_cli(_args(digits_root, tmp_path, "cut", "train.epochs=3"))
    assert "resumed from" in resumed.stdout
    assert _same_weights(ref / "checkpoints/best/model.safetensors",
                         tmp_path / "cut/checkpoints/best/model.safetensors")
    assert read_jsonl(ref / "metrics.jsonl") == read_jsonl(tmp_path / "cut/metrics.jsonl")
    assert (ref / "test_metrics.json").read_text() == (tmp_path / "cut/test_metrics.json").read_text()


def test_early_stopping_restores_best_weights(digits_root: Path, tmp_path: Path) -> None:
    # lr tiny after epoch 1 with a plateau scheduler: val/accuracy cannot keep improving for long.
    run_cli(_args(digits_root, tmp_path, "es", "train.epochs=30", "train.early_stopping_patience=2",
                  "optim.lr=0.00001", "scheduler.name=constant", "train.monitor=val/loss", "train.monitor_mode=min",
                  "train.early_stopping_min_delta=0.5"))
    rows = read_jsonl(tmp_path / "es/metrics.jsonl")
    assert len(rows) == 3  # best at epoch 1, then 2 epochs without an improvement of 0.5
    best = json.loads((tmp_path / "es/checkpoints/best/state.json").read_text())
    assert best["train"]["epoch"] == 1


@pytest.mark.parametrize("extra", [
    ["optim.name=sgd", "optim.nesterov=true", "scheduler.name=step", "scheduler.step_size=1",
     "train.grad_accum_steps=3", "train.max_grad_norm=1.0"],
    ["optim.name=rmsprop", "scheduler.name=plateau", "train.precision=bf16", "optim.loss=bce"],
    ["optim.name=adam", "model.residual=true", "model.channels_last=true", "optim.label_smoothing=0.1",
     "optim.class_weights=[1,1,1,1,1,1,1,1,1,2]"],
])
def test_training_variants_run_and_learn(digits_root: Path, tmp_path: Path, extra: list[str]) -> None:
    run_cli(_args(digits_root, tmp_path, "v", "train.epochs=2", "optim.lr=0.01", *extra))
    rows = read_jsonl(tmp_path / "v/metrics.jsonl")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] * 1.05 or rows[-1]["val/accuracy"] > 0.3
    if "train.grad_accum_steps=3" in extra:
        assert rows[-1]["step"] == 2 * 14  # ceil(40 micro-batches / 3) per epoch
    if "scheduler.name=step" in extra:
        # The logged lr is the one used during the epoch; StepLR decays it after each epoch.
        assert rows[0]["lr"] == pytest.approx(0.01) and rows[1]["lr"] == pytest.approx(0.001)


def test_warmup_cosine_shape() -> None:
    f = warmup_cosine(warmup=4, total=14, min_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 3)] == [0.2, 0.8]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(9) == pytest.approx(0.55)


def test_losses() -> None:
    cfg = load_config(None, ["optim.loss=bce"]).optim
    logits, target = torch.zeros(2, 3), torch.tensor([0, 2])
    assert build_loss(cfg, 3)(logits, target).item() == pytest.approx(0.693147, abs=1e-5)
    ce = build_loss(load_config(None, ["optim.class_weights=[1,0,0]"]).optim, 3)
    assert ce(torch.tensor([[0.0, 0, 0], [0, 0, 0]]), target).item() == pytest.approx(1.098612, abs=1e-5)
    with pytest.raises(ValueError, match="has 3 values; the data has 4 classes"):
        build_loss(load_config(None, ["optim.class_weights=[1,1,1]"]).optim, 4)


def test_the_resume_line_names_the_epoch_the_epoch_lines_print():
    """state.epoch counts completed epochs: a resume 3 batches into the fifth epoch is 'in epoch 5', not 'epoch 4'."""
    from pipeline.training.state import TrainState, resume_point

    assert resume_point(TrainState(epoch=4, global_step=63, step_in_epoch=3)) == \
        "in epoch 5 after 3 of its batches (step 63)"
    assert resume_point(TrainState(epoch=4, global_step=60, step_in_epoch=0)) == "after epoch 4 (step 60)"
