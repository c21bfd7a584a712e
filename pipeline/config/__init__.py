"""Typed, documented configuration: schema dataclasses and the YAML/override loader."""

from pipeline.config.loader import ConfigError, config_from_dict, load_config, to_yaml
from pipeline.config.schema import Config

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "to_yaml"]
