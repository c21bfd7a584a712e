"""Config: defaults <- YAML <- overrides; every bad input is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, to_yaml
from pipeline.config.reference import BEGIN, END, reference_markdown
from tests.conftest import ROOT, run_cli


def test_merge_order_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 16\noptim:\n  name: sgd\n")
    cfg = load_config(path, ["train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.name) == (3, 16, "sgd")
    assert cfg.optim.lr == 1e-3  # schema default untouched
    again = load_config(None, [])
    assert again.train.epochs == 30


@pytest.mark.parametrize("overrides, fragment", [
    (["train.epochz=3"], "unknown config key 'train.epochz'"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["train.epochs=abc"], "train.epochs"),
    (["train.epochs=0"], "train.epochs=0 is out of range"),
    (["optim.name=lamb"], "optim.name='lamb' is not valid; choose one of sgd, adam, adamw, rmsprop"),
    (["train.precision=fp8"], "train.precision"),
    (["data.channels=2"], "data.channels=2"),
    (["data.mean=[0.1,0.2]"], "data.mean has 2 values"),
    (["data.augment.hflip=1.5"], "data.augment.hflip=1.5 is out of range"),
    (["train.cpu=maybe"], "train.cpu"),
    (["trainepochs"], "not of the form dotted.key=value"),
    (["checkpoint.signals=[SIGFOO]"], "checkpoint.signals[]='SIGFOO'"),
    (["scheduler.name=linear"], "scheduler.name='linear' is not valid"),
    (["train.monitor=val/acc"], "train.monitor='val/acc' is not valid"),
])
def test_bad_values_raise_one_line(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_yaml_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("args, fragment", [
    (["train", "configs/missing.yaml"], "config file 'configs/missing.yaml' not found"),
    (["train", "configs/default.yaml", "train.epochs=-1"], "train.epochs=-1 is out of range"),
    (["train", "configs/default.yaml", "model.nme=x"], "unknown config key 'model.nme'"),
    (["train", "configs/default.yaml", "model.name=resnet9000", "data.root=/nonexistent/x",
      "data.auto_prepare_digits=false"], "data.root='/nonexistent/x' does not exist"),
    (["evaluate", "/nonexistent/run"], "run folder '/nonexistent/run' does not exist"),
    (["data", "shards", "/nonexistent/src", "/tmp/out"], "source '/nonexistent/src' does not exist"),
])
def test_cli_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    result = run_cli(args, check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "default.yaml", ["optim.lr=0.01"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                         if not p.name.startswith("tune")))  # tune_*.yaml: commands/test_tuning.py
def test_shipped_configs_load(name: str) -> None:
    load_config(ROOT / "configs" / name)


def test_config_reference_is_current() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    block = doc[doc.index(BEGIN):doc.index(END) + len(END)]
    assert block == reference_markdown(), "run: python -m pipeline.config.reference docs/configuration.md"
