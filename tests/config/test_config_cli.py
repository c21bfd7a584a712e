"""`pipeline config keys|show` and the "did you mean" of a mistyped key, wherever keys are given."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from pipeline.commands.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.config.schema import Config, OptimConfig
from tests.conftest import ROOT


def _leaf_fields(cls: type) -> int:
    """Fields of the schema, sections expanded (a section is not a key, its fields are)."""
    count = 0
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        count += _leaf_fields(type(default)) if dataclasses.is_dataclass(default) else 1
    return count


def test_config_keys_lists_every_schema_field_once(capsys) -> None:
    assert main(["config", "keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == _leaf_fields(Config) > 100  # the count, not a number to update with each new field
    keys = [line.split()[0] for line in lines]
    assert len(set(keys)) == len(keys)
    epochs = next(line for line in lines if line.startswith("train.epochs "))
    assert epochs.split()[1:3] == ["int", "30"] and epochs.endswith("Number of passes over the training split.")


def test_config_keys_prefix_and_json(capsys) -> None:
    assert main(["config", "keys", "optim", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows][:2] == ["optim.name", "optim.lr"]
    assert len(rows) == _leaf_fields(OptimConfig)  # one row per field of the section
    assert rows[1] == {"key": "optim.lr", "type": "float", "default": 0.001,
                       "doc": "Peak learning rate (per optimizer step, after accumulation)."}
    assert all(r["doc"] for r in rows), "every field has a docstring"
    assert main(["config", "keys", "trian"]) == 2
    assert "no config key starts with 'trian'; did you mean 'train'?" in capsys.readouterr().err


def test_config_show_reflects_yaml_and_overrides_and_masks_secrets(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\noptim:\n  name: sgd\n")
    secret_url = "logging.wandb_base_url=https://me:hunter2@wb.example"
    assert main(["config", "show", str(path), "train.epochs=3", secret_url]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert (shown["train"]["epochs"], shown["optim"]["name"], shown["optim"]["lr"]) == (3, "sgd", 0.001)
    assert "hunter2" not in out and shown["logging"]["wandb_base_url"] == "https://me:***@wb.example"
    assert main(["config", "show", "train.batch_size=8"]) == 0  # overrides alone: the schema's defaults under them
    assert yaml.safe_load(capsys.readouterr().out)["train"] == {**shown["train"], "epochs": 30, "batch_size": 8}


@pytest.mark.parametrize("override, suggestion", [
    ("train.epohcs=3", "train.epochs"),
    ("optim.lr_=0.1", "optim.lr"),
    ("trian.epochs=3", "train"),
    ("data.augment.hflp=0.5", "data.augment.hflip"),
])
def test_mistyped_override_says_did_you_mean(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'\\?"):
        load_config(ROOT / "configs" / "default.yaml", [override])


def test_did_you_mean_in_every_command(tmp_path: Path, capsys) -> None:
    for argv in (["train", "train.epohcs=3"], ["config", "show", "train.epohcs=3"], ["cv", "configs/default.yaml",
                                                                                     "folds=2", "train.epohcs=3"]):
        assert main(argv) == 2, argv
        assert "did you mean 'train.epochs'?" in capsys.readouterr().err, argv
    assert main(["tune", "configs/tune_digits.yaml", "tune.n_trails=2"]) == 2
    assert "unknown tune setting 'tune.n_trails'; did you mean 'tune.n_trials'?" in capsys.readouterr().err
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epohcs: 3\n")
    assert main(["config", "show", str(path)]) == 2
    assert f"unknown config key 'train.epohcs' (from {path}); did you mean 'train.epochs'?" in capsys.readouterr().err
