"""The config reference generated from the schema's field docstrings: the table in docs/configuration.md and
`pipeline config keys` read the same list (`config_keys`), so neither can drift from the schema."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.config.schema import Config, TuneConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


@dataclass(frozen=True)
class ConfigKey:
    """One settable key of the schema."""

    key: str
    """Dotted name, e.g. train.epochs."""
    type: str
    """The field's type as written in the schema, e.g. int, list[float], str | None."""
    default: Any
    """The schema's default value."""
    doc: str
    """The field's docstring, on one line."""

    @property
    def shown_default(self) -> str:
        return f'"{self.default}"' if isinstance(self.default, str) else repr(self.default)


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written directly under each field of a dataclass (or of the dataclass it extends)."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    return {**docs, **_own_field_docs(cls)}


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def type_name(hint: Any) -> str:
    """`Optional[list[float]]` -> 'list[float] | None'; `int` -> 'int'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " | ".join(type_name(a) for a in args if a is not type(None)) + (
            " | None" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def _keys(cls: type, instance: object, prefix: str) -> Iterator[ConfigKey]:
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(type(value), value, f"{prefix}{f.name}.")
        else:
            yield ConfigKey(f"{prefix}{f.name}", type_name(hints[f.name]), value, docs.get(f.name, ""))


def config_keys(prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of the schema (sections expanded), in schema order; only those under `prefix` if given
    (`train` or `train.` selects the train section, `train.ep` the keys starting so)."""
    keys = list(_keys(Config, Config(), ""))
    if not prefix:
        return keys
    section = prefix.rstrip(".") + "."
    return [k for k in keys if k.key.startswith(section) or k.key.startswith(prefix)]


def tune_keys() -> list[ConfigKey]:
    """The keys of a tuning file's `tune:` section (`pipeline tune`), with their defaults: not keys of a run's config,
    so not in `config_keys` (TuneConfig() itself is refused: its search space must be given)."""
    docs, hints = _field_docs(TuneConfig), typing.get_type_hints(TuneConfig)
    return [ConfigKey(f"tune.{f.name}", type_name(hints[f.name]),
                      f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default,
                      docs.get(f.name, "")) for f in dataclasses.fields(TuneConfig)]


def reference_markdown() -> str:
    lines = [BEGIN, "| key | default | meaning |", "|---|---|---|"]
    lines.extend(f"| `{k.key}` | `{k.shown_default}` | {k.doc.replace('|', '/')} |"  # a '|' would end the cell
                 for k in config_keys() + tune_keys())
    lines.append(END)
    return "\n".join(lines)


def write_into(doc_path: str) -> None:
    """Replace the block between the markers in `doc_path` (docs/configuration.md) with the current reference."""
    from pathlib import Path

    path = Path(doc_path)
    text = path.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + reference_markdown() + text[stop:])


if __name__ == "__main__":  # python -m pipeline.config.reference docs/configuration.md
    import sys

    write_into(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md")
