"""The config reference (Markdown) generated from the schema's field docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Iterator

from pipeline.config.schema import Config

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written directly under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _rows(cls: type, instance: object, prefix: str) -> Iterator[str]:
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _rows(type(value), value, f"{prefix}{f.name}.")
        else:
            shown = repr(value) if not isinstance(value, str) else f'"{value}"'
            yield f"| `{prefix}{f.name}` | `{shown}` | {docs.get(f.name, '')} |"


def reference_markdown() -> str:
    lines = [BEGIN, "| key | default | meaning |", "|---|---|---|"]
    default = Config()
    for f in dataclasses.fields(Config):
        section = getattr(default, f.name)
        lines.extend(_rows(type(section), section, f"{f.name}."))
    lines.append(END)
    return "\n".join(lines)




def write_into(readme_path: str) -> None:
    """Replace the block between the markers in `readme_path` with the current reference."""
    from pathlib import Path

    path = Path(readme_path)
    text = path.read_text()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + reference_markdown() + text[stop:])


if __name__ == "__main__":  # python -m pipeline.config.reference README.md
    import sys

    write_into(sys.argv[1] if len(sys.argv) > 1 else "README.md")
