"""Build a `Config` from schema defaults <- YAML file <- command-line dotted overrides.

Every failure is turned into a `ConfigError` whose message is one line naming the key or file and
what would be valid; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.config.schema import Config, text_problem
from pipeline.config.secrets import mask
from pipeline.errors import first_line


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message is a single line."""

    def __init__(self, message: object):
        super().__init__(one_line(str(message)))


def one_line(text: str) -> str:
    """`text` with control characters (newlines in a key or value...) shown as escapes, so it stays one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _valid_keys(node: type, prefix: str) -> str:
    names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    return ", ".join(f"{prefix}{n}" for n in names)


def did_you_mean(key: str) -> str:
    """"did you mean 'train.epochs'? " for the schema key (or section) closest to a mistyped `key`, else ''."""
    import difflib

    from pipeline.config.reference import config_keys

    leaves = [k.key for k in config_keys()]
    sections = sorted({leaf.rsplit(".", 1)[0] for leaf in leaves})
    close = difflib.get_close_matches(key, leaves + sections, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


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
        return (f"unknown config key '{key}' (from {source}); {did_you_mean(key)}"
                f"valid keys here: {_valid_keys(node, prefix)}")
    if isinstance(exc, ValidationError):
        msg = first_line(getattr(exc, "msg", None) or exc)
        if msg.startswith("Incompatible value 'None'"):
            msg = "it is empty (null); give a value"
        if "is not a subclass of" in msg:
            section = key or msg.split("subclass of ")[-1].split(".")[0]
            return (f"'{section}' is a section, not a value (from {source}); "
                    f"set its keys instead, e.g. train.epochs=5")
        return f"bad value for '{key}' (from {source}): {msg}"
    text = first_line(exc)
    if key:
        return f"bad value for '{key}' (from {source}): {text}"
    return f"invalid config (from {source}): {text}"


SCALARS = (bool, int, float, str)
MISSING_MARKER = "???"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (dict, DictConfig)):
        return "a mapping"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "a list"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"a date ({value}; quote it to make it text)"
    return _a(type(value).__name__)


def _check_value(value: Any, hint: Any, key: str, source: str, element: bool = False) -> None:
    """The layer's `value` has the shape the schema's type `hint` wants (section, list, mapping, scalar); else
    one line naming `key`. Scalars are then converted and range-checked by OmegaConf and `__post_init__`."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"bad value for '{key}' (from {source}): {why}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, str) and value.strip() == MISSING_MARKER:
        raise bad(f"'{MISSING_MARKER}' marks a missing value in OmegaConf; give a real value")
    if text_problem(value):
        raise bad(f"the text {text_problem(value)}")
    if dataclasses.is_dataclass(hint):
        if value is None:
            return  # OmegaConf says "not Optional"
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"'{key}' is a section, not a value (from {source}); set its keys instead, "
                              f"e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
        _check_layer(value, hint, key + ".", source)
    elif origin in (list, tuple):
        if value is None:
            return
        if not isinstance(value, (list, tuple)) and not OmegaConf.is_list(value):
            raise bad(f"{_kind(value)} where a list is expected, e.g. [1, 2]")
        for index, item in enumerate(value):
            _check_value(item, args[0] if args else Any, f"{key}[{index}]", source, element=True)
    elif origin is dict:
        if value is None:
            return
        if not isinstance(value, (dict, DictConfig)):
            raise bad(f"{_kind(value)} where a mapping is expected, e.g. {{name: 0.1}}")
        for name, item in value.items():
            if not isinstance(name, str):
                raise bad(f"key {name!r} is {_kind(name)}; keys must be text")
            _check_value(item, args[1] if len(args) > 1 else Any, f"{key}.{name}", source, element=True)
    elif hint in SCALARS:
        wanted = "text" if hint is str else _a(hint.__name__)
        if value is None:
            if element:
                raise bad(f"null where {wanted} is expected")
            return  # OmegaConf says "not Optional"
        if not isinstance(value, SCALARS):
            raise bad(f"{_kind(value)} where {wanted} is expected")


def _check_layer(layer: Any, schema: type, prefix: str, source: str) -> None:
    """Walk a raw config layer (a dict) along the schema; unknown keys are left to OmegaConf's message."""
    hints = typing.get_type_hints(schema)
    for name, value in layer.items():
        where = prefix.rstrip(".") or "the top level"
        if not isinstance(name, str):
            raise ConfigError(f"config key {name!r} under '{where}' (from {source}) is {_kind(name)}; keys are "
                              "names such as train or epochs")
        if not name.strip():
            raise ConfigError(f"an empty config key under '{where}' (from {source}); keys are names such as train")
        if name in hints:
            _check_value(value, hints[name], prefix + name, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a key given twice in one mapping is an error, not 'the last one silently wins'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    problem = f"the key {key!r} is given twice (first at line {seen[key] + 1})"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # unhashable key: yaml reports it below
                pass
        return super().construct_mapping(node, deep=deep)


OVERRIDE_KEY = re.compile(r"[A-Za-z0-9_\-*?]+(?:\.[A-Za-z0-9_\-*?]+)*")
"""A dotted key (with fnmatch patterns allowed for finetune.lr_mult: finetune.lr_mult.layer*=0.1)."""


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. train.epochs=5)")
        key = item.split("=", 1)[0]
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key part; write dotted.key=value (e.g. train.epochs=5)")
        if not OVERRIDE_KEY.fullmatch(key):
            raise ConfigError(f"override key {key!r} is not a dotted name such as train.epochs (lists are given "
                              "whole: data.mean=[0.5])")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one line
        hint = ("; inside [ ] quote items with braces or commas: data.train=\"['a-{0..9}.tar','b.tar']\""
                if any("{" in item for item in overrides) else "")
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {first_line(exc)}{hint}") from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (pass an existing YAML file, e.g. configs/default.yaml)")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...), "
                          f"not a {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The schema with its defaults, built once (merging copies it; it is never modified)."""
    return OmegaConf.structured(Config)


ONE_OR_LIST = {"data": ("train", "val", "test", "classes")}
"""List keys that also take a single string (one shard spec, one class file): it becomes a one-item list."""


def _one_or_list(raw: dict) -> None:
    for section, names in ONE_OR_LIST.items():
        values = raw.get(section)
        if isinstance(values, dict):
            for name in names:
                if isinstance(values.get(name), str):
                    values[name] = [values[name]]


def merge_layers(layers: Sequence[tuple[object, str]]) -> Config:
    """Schema defaults <- each (config layer, where it came from); validated; one-line ConfigError on failure.

    Never a traceback: each layer's shape is checked against the schema first (sections, lists,
    mappings, scalars), then OmegaConf converts types, then each dataclass's `__post_init__` checks
    values. Anything unforeseen still ends as a ConfigError naming the layer.
    """
    merged = _schema()
    for layer, source in layers:
        raw = OmegaConf.to_container(layer, resolve=False) if isinstance(layer, DictConfig) else layer
        if not isinstance(raw, dict):
            raise ConfigError(f"config from {source} must be a mapping of sections (data:, model:, ...)")
        _one_or_list(raw)
        _check_layer(raw, Config, "", source)
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(raw))
        except OmegaConfBaseException as exc:
            raise ConfigError(_explain(exc, source)) from None
        except Exception as exc:  # noqa: BLE001 - whatever OmegaConf raises becomes one line
            raise ConfigError(f"invalid config (from {source}): {first_line(exc)}") from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else None
        raise ConfigError(str(cause) if cause else _explain(exc, "config")) from None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"invalid config: {first_line(exc)}") from None
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
    """The resolved config as YAML, as written into the run folder; secrets are masked as *** (never saved)."""
    return OmegaConf.to_yaml(OmegaConf.create(mask(OmegaConf.to_container(OmegaConf.structured(config)))))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a plain dict (e.g. a run folder's config.yaml)."""
    return merge_layers([(data, "saved config")])
