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
from omegaconf import DictConfig, ListConfig, Node, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.config.schema import MAX_KEY, Config, text_problem
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

    if len(key) > MAX_KEY:
        return ""  # (difflib's cost grows with the key's length)
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


MISSING_MARKER = "???"
CONTAINERS = (dict, list, tuple, set, frozenset, DictConfig, ListConfig)
SCALARS = (bool, int, float, str)


def _unwrap(hint: Any) -> Any:
    """X for Optional[X]; any other hint as it is."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def _hint_at(key: str) -> Any:
    """The schema's type hint at a key as OmegaConf names it (model.channels[1], finetune.lr_mult.a); Any if none."""
    hint: Any = Config
    for part in re.findall(r"[^.\[\]]+", key):
        hint = _unwrap(hint)
        if dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(part, Any)
        elif typing.get_origin(hint) in (list, tuple, dict) and typing.get_args(hint):
            hint = typing.get_args(hint)[-1]  # the element of list[X] / tuple[X, X], the value of dict[str, X]
        else:
            return Any
    return hint


def _is_element(key: str) -> bool:
    """Whether `key` names an item of a list or mapping (model.channels[1], finetune.lr_mult.a), not a field."""
    parent = re.sub(r"(\[\d+\]|\.[^.\[\]]+)$", "", key)
    return parent != key and typing.get_origin(_unwrap(_hint_at(parent))) in (list, tuple, dict)


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


def _wanted(hint: Any) -> str:
    """What the schema's `hint` takes, as the end of "a list where ... is expected"."""
    hint = _unwrap(hint)
    if typing.get_origin(hint) in (list, tuple):
        return "a list is expected, e.g. [1, 2]"
    if typing.get_origin(hint) is dict:
        return "a mapping is expected, e.g. {name: 0.1}"
    if hint is str:
        return "text is expected"
    return f"{_a(hint.__name__)} is expected" if hint in SCALARS else "a number, text, a list or a mapping is expected"


def _bad(key: str, source: str, why: str) -> ConfigError:
    return ConfigError(f"bad value for '{key}' (from {source}): {why}")


def _check_shape(value: Any, hint: Any, key: str, source: str) -> None:
    """What OmegaConf does not check, or checks without naming the key: the shape of sections, lists and
    mappings (a list where a mapping goes, a list inside a list of numbers, a section given one value), the
    '???' marker, and text no config may hold (said with its source). Scalars are OmegaConf's to type (its
    errors worded by `_explain`) and each dataclass's `__post_init__` to range-check."""
    hint = _unwrap(hint)
    if value is None:
        return  # where null is not allowed, OmegaConf says so
    if isinstance(value, str) and value.strip() == MISSING_MARKER:
        raise _bad(key, source, f"'{MISSING_MARKER}' marks a missing value in OmegaConf; give a real value")
    if text_problem(value, key):
        raise _bad(key, source, f"the text {text_problem(value, key)}")
    if dataclasses.is_dataclass(hint):
        _check_section(value, hint, key, source)
    elif typing.get_origin(hint) in (list, tuple, dict):
        _check_items(value, hint, key, source)
    elif hint in SCALARS and isinstance(value, CONTAINERS):
        raise _bad(key, source, f"{_kind(value)} where {_wanted(hint)}")


def _check_items(value: Any, hint: Any, key: str, source: str) -> None:
    """A list or mapping where the schema has one, its keys text, each item checked against the item type."""
    mapping = typing.get_origin(hint) is dict
    if not isinstance(value, (dict, DictConfig) if mapping else (list, tuple, ListConfig)):
        raise _bad(key, source, f"{_kind(value)} where {_wanted(hint)}")
    item_hint = typing.get_args(hint)[-1] if typing.get_args(hint) else Any
    items = value.items() if mapping else ((f"[{index}]", item) for index, item in enumerate(value))
    for name, item in items:
        if not isinstance(name, str):
            raise _bad(key, source, f"key {name!r} is {_kind(name)}; keys must be text")
        if len(name) > MAX_KEY:
            raise _bad(key, source, f"a key of {len(name):,} characters; at most {MAX_KEY} are allowed")
        _check_shape(item, item_hint, f"{key}.{name}" if mapping else f"{key}{name}", source)


def _check_section(value: Any, section: type, key: str, source: str) -> None:
    if not isinstance(value, (dict, DictConfig)):
        raise ConfigError(f"'{key}' is a section, not a value (from {source}); set its keys instead, "
                          f"e.g. {key}.{dataclasses.fields(section)[0].name}=...")
    hints = typing.get_type_hints(section)
    for name, item in value.items():
        where = key or "the top level"
        if not isinstance(name, str):
            raise ConfigError(f"config key {name!r} under '{where}' (from {source}) is {_kind(name)}; keys are "
                              "names such as train or epochs")
        if not name.strip():
            raise ConfigError(f"an empty config key under '{where}' (from {source}); keys are names such as train")
        if len(name) > MAX_KEY:
            raise ConfigError(f"a config key of {len(name):,} characters under '{where}' (from {source}); keys are "
                              f"names such as train (at most {MAX_KEY} characters)")
        if name in hints:  # an unknown key: OmegaConf's (see _explain)
            _check_shape(item, hints[name], f"{key}.{name}" if key else name, source)


def _explain(exc: OmegaConfBaseException, source: str) -> str:
    """OmegaConf's error as one line naming the key and what would be valid."""
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError):
        node, prefix = _schema_node(key)
        return (f"unknown config key '{key}' (from {source}); {did_you_mean(key)}"
                f"valid keys here: {_valid_keys(node, prefix)}")
    value = getattr(exc, "value", None)
    if isinstance(value, Node):
        value = value._value()  # noqa: SLF001 - the plain value (a Node has no public accessor)
    if not isinstance(value, (*SCALARS, type(None))) or (value is None and _is_element(key)):  # a date, a set, bytes
        return f"bad value for '{key}' (from {source}): {_kind(value)} where {_wanted(_hint_at(key))}"
    if isinstance(exc, ValidationError):
        msg = first_line(getattr(exc, "msg", None) or exc)
        if value is None:
            msg = "it is empty (null); give a value"
        return f"bad value for '{key}' (from {source}): {msg}"
    text = first_line(exc)
    if key:
        return f"bad value for '{key}' (from {source}): {text}"
    return f"invalid config (from {source}): {text}"


MAX_CONFIG_BYTES = 16 * 2**20
"""Largest config file read (16 MiB); a file is read whole before anything in it is checked."""
MAX_CONFIG_VALUES = 100_000
"""Most values (mappings, lists, scalars) one config layer may hold once its aliases are expanded."""
MAX_ALIAS_VALUES = 2_000
"""Most values YAML aliases (*name) may add by repeating anchors (&name): enough to reuse a list of shards or
numbers, far below a "billion laughs" (7 nested levels of 9 aliases expand 2 KB to 4.8 million values)."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of mappings and lists (the schema needs 4: finetune.lr_mult.<pattern>)."""


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when present: 50x faster
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


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _size_problem(root: yaml.Node) -> str:
    """Why the YAML node graph `root` is too big to build, or ''. Counted on the composed graph, where an alias is
    one shared node, so a bomb costs its file size here and never its expansion: each node's expanded size (values,
    characters, depth) is summed once from its children's, bottom-up without recursion."""
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (values, characters, depth) once expanded
    distinct = 0
    open_nodes: set[int] = set()  # started, not finished: the path from the root to the node at hand
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            kids = [sizes[id(kid)] for kid in _children(node)]
            values = 1 + sum(k[0] for k in kids)
            chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(k[1] for k in kids)
            depth = 1 + max((k[2] for k in kids), default=0)
            sizes[id(node)] = (values, chars, depth)
            open_nodes.discard(id(node))
            distinct += 1
            if values - distinct > MAX_ALIAS_VALUES:
                return (f"its anchors and aliases (&name, *name) expand to more than {MAX_ALIAS_VALUES:,} repeated "
                        f"values (a 'billion laughs' bomb?); write the values out or use fewer aliases")
            if values > MAX_CONFIG_VALUES or chars > MAX_CONFIG_BYTES:
                return (f"it holds more than {MAX_CONFIG_VALUES:,} values or {MAX_CONFIG_BYTES // 2**20} MiB of text "
                        "once its aliases are expanded; a config is far smaller")
            if depth > MAX_CONFIG_DEPTH:
                return f"it nests mappings and lists more than {MAX_CONFIG_DEPTH} levels deep; the schema needs 4"
        elif id(node) in open_nodes:
            return "an alias (*name) refers to a mapping or list that holds it (&name): the value would be endless"
        elif id(node) not in sizes:
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((kid, False) for kid in _children(node))
    return ""


def _compose(text: str) -> tuple[_UniqueKeyLoader, yaml.Node | None]:
    """The YAML node graph of `text` (parsed, nothing built yet) and the loader that builds it."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader, loader.get_single_node()
    except BaseException:
        loader.dispose()
        raise


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
        _check_override_size(item)
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one line
        hint = ("; inside [ ] quote items with braces or commas: data.train=\"['a-{0..9}.tar','b.tar']\""
                if any("{" in item for item in overrides) else "")
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {first_line(exc)}{hint}") from None


def _check_override_size(item: str) -> None:
    """An override's value is YAML to OmegaConf, which builds it whole: its size is checked first, as a file's is."""
    key, _, value = item.partition("=")
    if "*" not in value and "&" not in value and len(value) < 4096:  # no alias, and too short to hold much
        return
    try:
        loader, node = _compose(value)
        loader.dispose()
    except (yaml.YAMLError, RecursionError):
        return  # not YAML OmegaConf can read either: _parse_overrides words its error
    problem = _size_problem(node) if node is not None else ""
    if problem:
        raise ConfigError(f"override {key}=... (command line) is refused: {problem}")


def read_yaml(path: Path) -> object:
    """The YAML document at `path`, refused (one line) before it is built when it is too big, too deep or an alias
    bomb: aliases are counted on the parsed node graph, where each is one node, so the check costs the file's size."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (pass an existing YAML file, e.g. configs/default.yaml)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{path}' is {path.stat().st_size:,} bytes; a config file is at most "
                          f"{MAX_CONFIG_BYTES // 2**20} MiB")
    loader, node = _compose(path.read_text())
    try:
        problem = _size_problem(node) if node is not None else ""
        if problem:
            raise ConfigError(f"config file '{path}' is refused: {problem}")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _load_yaml(path: Path) -> DictConfig:
    try:
        data = read_yaml(path) or {}
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

    Never a traceback: the shape of each layer's sections, lists and mappings is checked against the
    schema first (`_check_shape`: what OmegaConf lets through or reports without the key), then OmegaConf
    types the scalars (its errors worded by `_explain`), then each dataclass's `__post_init__` checks values.
    Anything unforeseen still ends as a ConfigError naming the layer.
    """
    merged = _schema()
    for layer, source in layers:
        raw = OmegaConf.to_container(layer, resolve=False) if isinstance(layer, DictConfig) else layer
        if not isinstance(raw, dict):
            raise ConfigError(f"config from {source} must be a mapping of sections (data:, model:, ...)")
        _one_or_list(raw)
        _check_section(raw, Config, "", source)
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


def to_yaml(config: Config | dict) -> str:
    """The resolved config as YAML, as written into the run folder; secrets are masked as *** (never saved).
    `config`: a Config, or its plain containers when the caller has them already (`OmegaConf.to_container`)."""
    resolved = config if isinstance(config, dict) else OmegaConf.to_container(OmegaConf.structured(config))
    return OmegaConf.to_yaml(OmegaConf.create(mask(resolved)))


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from a plain dict (e.g. a run folder's config.yaml)."""
    return merge_layers([(data, "saved config")])
