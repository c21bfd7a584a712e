"""Secrets never reach a saved config, a log line, metrics.jsonl or W&B: they are masked as `***`.

Three kinds are recognised:

- a value under a key whose name looks secret (`password`, `passwd`, `pwd`, `token`, `secret`, `api_key`,
  `apikey`, `credential`, `private_key`, `authorization`, `auth_key`), in a config or any other mapping;
- the password of a URL (`postgresql://user:pass@host/db` -> `postgresql://user:***@host/db`), and
  `key=value` pairs whose key looks secret (in URL queries, command lines, error messages);
- the value of any environment variable whose name looks secret (`WANDB_API_KEY`, `HF_TOKEN`,
  `AWS_SECRET_ACCESS_KEY`, ...) and the password in `PIPELINE_TUNE_STORAGE`, wherever it appears.

Every place that writes a config or a message outside the process goes through `mask` or
`mask_text`: `to_yaml` (run folder config.yaml, tuning files, the report), the W&B config and
command line, `Dist.print`, `warn`, metrics.jsonl strings and the CLI's error line.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

MASK = "***"
SECRET_NAME = re.compile(r"passw(?:or)?d|pwd|token(?!iz)|secret|api[_-]?key|credential|private[_-]?key|"
                         r"authorization|auth[_-]?key", re.IGNORECASE)
"""Key or variable names whose values are secret."""
NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD"})
"""Names that match SECRET_NAME by accident but hold nothing secret (never masked as environment values)."""
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)(?P<password>[^/?#\s]+)(?=@)")
KEY_VALUE = re.compile(r"(?P<key>[A-Za-z0-9_.\-]*(?:" + SECRET_NAME.pattern + r")[A-Za-z0-9_.\-]*)"
                       r"(?P<sep>\s*[=:]\s*|=)(?P<value>[^\s&,;'\"}]+)", re.IGNORECASE)
MIN_ENV_SECRET = 6
"""Shorter environment values are not masked by value (masking "1" or "true" everywhere would garble text)."""
URL_ENV_NAMES = ("PIPELINE_TUNE_STORAGE", "DATABASE_URL")
"""Environment variables holding URLs whose password is secret."""


def is_secret_name(name: str) -> bool:
    """True if a key or variable called `name` holds a secret."""
    return bool(SECRET_NAME.search(str(name))) and str(name).upper() not in NOT_SECRET_NAMES


def _env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Secret values currently in the environment, longest first (so a value inside another is masked whole)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= MIN_ENV_SECRET}
    for name in URL_ENV_NAMES:
        match = URL_PASSWORD.search(environ.get(name, ""))
        if match and len(match["password"]) >= 3:
            values.add(match["password"])
    return sorted(values, key=len, reverse=True)


def mask_url(url: str) -> str:
    """`url` with its password replaced by ***."""
    return URL_PASSWORD.sub(lambda m: m["head"] + MASK, url)


def mask_text(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords, secret `key=value` values and secret environment values masked."""
    if not text:
        return text
    text = mask_url(text)
    text = KEY_VALUE.sub(lambda m: m["key"] + m["sep"] + (m["value"] if m["value"] == MASK else MASK), text)
    for secret in [*_env_secrets(), *extra_secrets]:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def mask(value: Any, key: str = "") -> Any:
    """A copy of a config-like structure (dicts, lists, scalars) with every secret masked."""
    scalar = not isinstance(value, (bool, dict, list, tuple))
    if key and is_secret_name(key) and scalar and value not in (None, "", MASK):
        return MASK
    if isinstance(value, dict):
        return {k: mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask(v) for v in value)
    if isinstance(value, str):
        return mask_text(value)
    return value
