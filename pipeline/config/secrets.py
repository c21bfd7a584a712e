"""Secrets never reach a saved config, a log line, metrics.jsonl or W&B: they are masked as `***`.

Three kinds are recognised:

- a value under a key whose name looks secret (`password`, `passwd`, `pwd`, `token`, `secret`, `api_key`,
  `apikey`, `credential`, `private_key`, `authorization`, `auth_key`), in a config or any other mapping;
- the password of a URL (`postgresql://user:pass@host/db` -> `postgresql://user:***@host/db`), and
  `key=value` pairs whose key looks secret (in URL queries, command lines, error messages);
- the value of any environment variable whose name looks secret (`WANDB_API_KEY`, `HF_TOKEN`,
  `AWS_SECRET_ACCESS_KEY`, ...) and the password in `PIPELINE_TUNE_STORAGE`, wherever it appears.

Where a URL's password ends. A password may hold any character, percent-encoded or not; a raw `/ # ? @`
makes the URL ambiguous, so the rule errs towards masking too much (like curl, and like urllib for `@`):

- the userinfo runs from `scheme://` to the LAST `@` of the URL; the password is what follows the first `:`
  in it (the user name before that `:` holds no raw `: / ? #`);
- in free text (log lines, error messages) a URL ends at whitespace, so its last `@` is the last one before
  the next whitespace or the end; a whole string that starts with a URL (a config value, a `key=URL`
  command-line argument) is one URL, so its password may hold raw spaces too;
- a password with a raw space is ambiguous in free text: it is masked there when its URL is known, i.e. it was
  a config value passed to `mask`, a command-line argument of this process, or in PIPELINE_TUNE_STORAGE.

So `https://u:a/b#c?d@e@host/x` masks `a/b#c?d@e`; the cost is that a URL without a password, followed in
the same whitespace-free run by a `:` and an `@` (`http://host:80/p@q`), loses more than it needs to.

Every place that writes a config or a message outside the process goes through `mask`, `mask_value` or
`mask_text`: `to_yaml` (run folder config.yaml, tuning files, the report), the W&B config and
command line, `Dist.print`, `warn`, metrics.jsonl strings and the CLI's error line.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable

MASK = "***"
SECRET_NAME = re.compile(r"passw(?:or)?d|pwd|token(?!iz)|secret|api[_-]?key|credential|private[_-]?key|"
                         r"authorization|auth[_-]?key", re.IGNORECASE)
"""Key or variable names whose values are secret."""
NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD"})
"""Names that match SECRET_NAME by accident but hold nothing secret (never masked as environment values)."""
_URL_HEAD = r"[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#\s]*:"
URL_PASSWORD = re.compile(r"(?<![A-Za-z0-9+.\-])(?P<before>[0-9+.\-]*+)"
                          r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*+://[^:/?#\s]*+:)(?P<password>\S+)(?=@)")
"""A URL password in free text: up to the last `@` before whitespace (greedy `\\S+` backs off to it). A scheme is
tried only from the start of its run of scheme characters (`before`: digits and +.- ahead of its first letter), and
possessively, so the search is linear in the text (tried from every character, long words cost quadratic time)."""
WHOLE_URL_PASSWORD = re.compile(rf"(?P<head>(?:[^=\s]*=)?{_URL_HEAD})(?P<password>.+)(?=@)", re.DOTALL)
"""A URL password in a whole string that starts with the URL (or `key=`): up to its last `@`, spaces and all."""
_WORD = r"[A-Za-z0-9_.\-]"
KEY_VALUE = re.compile(rf"(?<!{_WORD})(?P<key>(?>{_WORD}*?(?:{SECRET_NAME.pattern})){_WORD}*+)"
                       r"(?P<sep>\s*+[=:]\s*+)(?P<value>[^\s&,;'\"}]+)", re.IGNORECASE)
"""`key=value` (or `key: value`) whose key holds a secret name. Linear in the text: a key is tried only from the
start of its word, the word's first secret name is the only one tried (atomic group), and the rest of the word is
taken possessively; a 10 KB word cost 10 s with backtracking from every character."""
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
        match = WHOLE_URL_PASSWORD.match(environ.get(name, ""))
        if match and len(match["password"]) >= 3:
            values.add(match["password"])
    return sorted(values, key=len, reverse=True)


_known_urls: set[tuple[str, str]] = set()
"""(URL head, password) of passwords with whitespace seen by `mask_value`: free text cannot delimit them."""


def _spaced_password(text: str) -> tuple[str, str] | None:
    """(URL head, password) of the URL that `text` starts with, if its password holds whitespace."""
    match = WHOLE_URL_PASSWORD.match(text)
    if not match or not re.search(r"\s", match["password"]):
        return None
    head = match["head"]
    return head[head.index("://"):], match["password"]


def _known_spaced_passwords() -> set[tuple[str, str]]:
    """URL passwords with whitespace from configs masked so far, this process's arguments and the environment."""
    found = {_spaced_password(arg) for arg in sys.argv[1:]}
    found |= {_spaced_password(os.environ.get(name, "")) for name in URL_ENV_NAMES}
    return (found - {None}) | _known_urls


def mask_value(text: str) -> str:
    """`text` masked as one value (a config value, a command-line argument): if it starts with a URL (or
    `key=URL`), everything up to that URL's last `@` after `user:` is its password, spaces included."""
    known = _spaced_password(text)
    if known:
        _known_urls.add(known)
    match = WHOLE_URL_PASSWORD.match(text)
    return mask_text(match["head"] + MASK + text[match.end():] if match else text)


def mask_url(url: str) -> str:
    """`url` (a whole URL) with its password replaced by ***."""
    return mask_value(url)


def _mask_url_passwords(text: str) -> str:
    """URL_PASSWORD masked in each whitespace-free run of `text`, searched only up to the run's last `@` (where the
    password ends): a scheme after it, with no `@` to end a password, would otherwise scan to the run's end again."""
    if "://" not in text or "@" not in text:
        return text

    def run(match: re.Match) -> str:
        word = match[0]
        end = word.rfind("@") + 1
        if not end or "://" not in word[:end]:
            return word
        return URL_PASSWORD.sub(lambda m: m["before"] + m["head"] + MASK, word[:end]) + word[end:]

    return re.sub(r"\S+", run, text)


def mask_text(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords, secret `key=value` values and secret environment values masked."""
    if not text:
        return text
    for head, password in _known_spaced_passwords():
        text = text.replace(f"{head}{password}@", f"{head}{MASK}@")
    text = _mask_url_passwords(text)
    if SECRET_NAME.search(text):  # most text names no secret: one quick scan instead of the key search
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
        return mask_value(value)
    return value
