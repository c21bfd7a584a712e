"""Build a `Config` from schema defaults <- YAML file <- command-line dotted overrides.

Every failure is turned into a `ConfigError` whose message is one line naming the key or file and
what would be valid; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.config.schema import Config


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message is a single line."""


def _valid_keys(node: type, prefix: str) -> str:
    names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    return ", ".join(f"{prefix}{n}" for n in names)


def _schema_node(dotted: str) -> tuple[type, str]:
    """Walk the schema along `dotted` as far as it exists; return (dataclass, its prefix)."""
    node: object = Config()
    prefix = ""
    for part in dotted.split(".")[:-1]:
        child = getattr(node, part, None)
        if not dataclasses.is_dataclass(child):
            break
        node, prefix = child, prefix + part + "."
    return type(node), prefix


def _explain(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError):
        node, prefix = _schema_node(key)
        return f"unknown config key '{key}' (from {source}); valid keys here: {_valid_keys(node, prefix)}"
    if isinstance(exc, ValidationError):
        msg = (getattr(exc, "msg", None) or str(exc) or type(exc).__name__).splitlines()[0]
        if "is not a subclass of" in msg:
            section = key or msg.split("subclass of ")[-1].split(".")[0]
            return (f"'{section}' is a section, not a value (from {source}); "
                    f"set its keys instead, e.g. train.epochs=5")
        return f"bad value for '{key}' (from {source}): {msg}"
    text = (str(exc) or type(exc).__name__).splitlines()[0]
    return f"invalid config (from {source}): {text}"


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. train.epochs=5)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one line
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {str(exc).splitlines()[0]}") from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (pass an existing YAML file, e.g. configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...), "
                          f"not a {type(data).__name__}")
    return OmegaConf.create(data)


def merge_layers(layers: Sequence[tuple[object, str]]) -> Config:
    """Schema defaults <- each (config layer, where it came from); validated; one-line ConfigError on failure."""
    merged = OmegaConf.structured(Config)
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_explain(exc, source)) from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else None
        raise ConfigError(str(cause) if cause else _explain(exc, "config")) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    assert isinstance(config, Config)
    return config


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults, the YAML at `path` and `overrides`; validate; return a typed `Config`."""
    layers = []
    if path is not None:
        layers.append((_load_yaml(Path(path)), str(path)))
    if overrides:
        layers.append((_parse_overrides(overrides), "command line"))
    return merge_layers(layers)


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, as written into the run folder."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a plain dict (e.g. a run folder's config.yaml)."""
    return merge_layers([(OmegaConf.create(data), "saved config")])
