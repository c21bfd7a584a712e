"""The `tune:` section of a tuning YAML, and how a tuning file splits into search settings + base config.

A tuning file is an ordinary training config (data:, model:, optim:, ...) plus one `tune:` section.
The training sections are the *base config* every trial starts from; `tune.space` says which keys
each trial changes. `tune.base_config` may name another YAML (e.g. configs/default.yaml) that is
loaded first, so a tuning file can be just a `tune:` section on top of an existing config.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pipeline.config import Config, ConfigError
from pipeline.config.loader import _parse_overrides, merge_layers, read_yaml
from pipeline.config.schema import TuneConfig
from pipeline.errors import first_line


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' not found (pass an existing YAML file, e.g. configs/tune_digits.yaml)")
    try:
        data = read_yaml(path) or {}  # size, depth and aliases checked before anything is built
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}' must hold a mapping (tune:, data:, model:, ...)")
    return data


def load_tune_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[TuneConfig, Config]:
    """Split the tuning file into (TuneConfig, base Config); `tune.*` overrides go to the former."""
    path = Path(path)
    data = _read_yaml(path, "tuning file")
    tune_data = data.pop("tune", None)
    if not isinstance(tune_data, dict):
        raise ConfigError(f"tuning file '{path}' has no 'tune:' section (with at least tune.space)")
    tune_overrides = [o for o in overrides if o.startswith("tune.")]
    base_overrides = [o for o in overrides if not o.startswith("tune.")]
    for item in tune_overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. tune.n_trials=8)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TuneConfig), OmegaConf.create(tune_data),
                                 OmegaConf.from_dotlist([o[len("tune."):] for o in tune_overrides]))
        tune = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else None
        key = getattr(exc, "full_key", "") or ""
        detail = str(cause) if cause else f"bad tune setting '{key}': {first_line(exc)}"
        if isinstance(exc, ConfigKeyError) and not cause:
            names = [f"tune.{f.name}" for f in dataclasses.fields(TuneConfig)]
            close = difflib.get_close_matches(f"tune.{key}", names, n=1, cutoff=0.6)
            detail = (f"unknown tune setting 'tune.{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
                      + f"; valid: {', '.join(names)}")
        raise ConfigError(f"{detail} (in '{path}' or the command line)") from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    assert isinstance(tune, TuneConfig)
    layers: list[tuple[object, str]] = []
    if tune.base_config:
        base_path = Path(tune.base_config)
        if not base_path.is_file() and (path.parent / base_path).is_file():
            base_path = path.parent / base_path
        layers.append((_read_yaml(base_path, "tune.base_config"), str(base_path)))
    layers.append((data, str(path)))
    if base_overrides:
        layers.append((_parse_overrides(base_overrides), "command line"))
    return tune, merge_layers(layers)


