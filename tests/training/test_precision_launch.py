"""accelerate launch's mixed_precision and train.precision: one rule (an explicit train.precision wins and one line
says so when they differ; auto takes accelerate's value, fp32 when not launched by accelerate); bf16 really runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.commands.train import train
from pipeline.config import load_config
from pipeline.distributed import LAUNCHER_PRECISION_ENV, choose_precision
from pipeline.training.callbacks import Callback
from tests.conftest import ROOT, TINY


@pytest.mark.parametrize("configured, launched, expected, note", [
    ("auto", None, "fp32", ""),
    ("auto", "bf16", "bf16", "precision: bf16 (train.precision=auto: accelerate launch's mixed_precision)"),
    ("auto", "no", "fp32", "precision: fp32 (train.precision=auto: accelerate launch's mixed_precision)"),
    ("bf16", None, "bf16", ""),
    ("bf16", "bf16", "bf16", ""),
    ("fp32", "bf16", "fp32", "precision: train.precision=fp32 wins over accelerate launch's mixed_precision=bf16 "
                             "(train.precision=auto would use accelerate's)"),
    ("bf16", "no", "bf16", "precision: train.precision=bf16 wins over accelerate launch's mixed_precision=no "
                           "(train.precision=auto would use accelerate's)"),
])
def test_the_precision_rule(monkeypatch, configured: str, launched: str | None, expected: str, note: str) -> None:
    if launched is None:
        monkeypatch.delenv(LAUNCHER_PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(LAUNCHER_PRECISION_ENV, launched)
    assert choose_precision(configured) == (expected, note)


def test_auto_refuses_a_launcher_precision_it_cannot_run(monkeypatch) -> None:
    monkeypatch.setenv(LAUNCHER_PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match="mixed_precision=fp8 is not supported here; set train.precision"):
        choose_precision("auto")
    assert choose_precision("fp32")[0] == "fp32"


class AutocastProbe(Callback):
    """Records, in a forward hook on the first conv, the autocast state and the dtype of what it computes."""

    def __init__(self) -> None:
        self.seen: set[tuple[bool, torch.dtype, torch.dtype]] = set()

    def on_fit_start(self, trainer) -> None:
        conv = next(m for m in trainer.unwrapped.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, args, output: self.seen.add(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype)))


def test_auto_under_accelerates_bf16_trains_in_bf16(digits_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(LAUNCHER_PRECISION_ENV, "bf16")  # what `accelerate launch` sets from its config file
    cfg = load_config(ROOT / "configs" / "default.yaml", [
        f"data.root={digits_root}", f"run.output_dir={tmp_path}", "run.name=r", "data.num_workers=0",
        "train.epochs=1", *TINY])
    assert cfg.train.precision == "auto"
    probe = AutocastProbe()
    train(cfg, callbacks=[probe])
    assert probe.seen == {(True, torch.bfloat16, torch.bfloat16)}  # training and validation forwards alike
    assert "precision: bf16 (train.precision=auto: accelerate launch's mixed_precision)" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["precision"] == "bf16"


@pytest.mark.slow  # a real `accelerate launch` (~15 s): the launcher sets the variable the in-process test sets
def test_accelerate_launch_config_file_bf16_is_honoured(digits_root: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\n"
                           "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "-m", "pipeline",
           "train", "configs/default.yaml", f"data.root={digits_root}", f"run.output_dir={tmp_path}", "run.name=r",
           "data.num_workers=0", "train.epochs=1", *TINY]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "precision: bf16 (train.precision=auto: accelerate launch's mixed_precision)" in result.stdout
    assert ", bf16  |" in result.stdout  # the run folder line
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["train"]["precision"] == "bf16"
