"""`pipeline config keys [PREFIX]` and `pipeline config show [CONFIG] [key=value ...]`."""

from __future__ import annotations

import json
import sys

from pipeline.config import Config, ConfigError, to_yaml
from pipeline.config.loader import did_you_mean
from pipeline.config.reference import config_keys


def print_keys(prefix: str = "", as_json: bool = False) -> int:
    """Every key starting with `prefix`: type, default and meaning (a table, or JSON)."""
    keys = config_keys(prefix)
    if not keys:
        raise ConfigError(f"no config key starts with '{prefix}'; {did_you_mean(prefix)}"
                          "`pipeline config keys` lists them all")
    if as_json:
        print(json.dumps([{"key": k.key, "type": k.type, "default": k.default, "doc": k.doc} for k in keys], indent=2))
        return 0
    widths = [max(len(text) for text in column) for column in zip(*((k.key, k.type, k.shown_default) for k in keys))]
    for k in keys:
        print("  ".join(f"{text:<{w}}" for text, w in zip((k.key, k.type, k.shown_default), widths)) + f"  {k.doc}")
    print(f"{len(keys)} key(s); set any with key=value after the config (see: pipeline config show CONFIG key=value)",
          file=sys.stderr)
    return 0


def print_config(cfg: Config) -> int:
    """The resolved config as YAML, secrets masked, as in the run folder's config.yaml."""
    print(to_yaml(cfg), end="")
    return 0


__all__ = ["print_config", "print_keys"]
