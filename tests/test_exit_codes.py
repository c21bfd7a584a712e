"""Every exit code has one home: `pipeline.exits` defines each (and its docstring's table names it); no other module
of the package assigns an exit code (read with ast; nothing of the package but pipeline.exits is imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pipeline.exits as exits

PACKAGE = Path(exits.__file__).resolve().parent
CODE_NAME = re.compile(r"^(EXIT_[A-Z_]+|EX_[A-Z_]+)$")


def test_the_table_lists_every_code_with_its_number() -> None:
    codes = {name: value for name, value in vars(exits).items() if CODE_NAME.match(name)}
    assert len(codes) >= 9
    for name, value in codes.items():
        assert re.search(rf"^{value}\s+{name}\b", exits.__doc__, re.MULTILINE), f"{name} = {value} not in the table"


def test_no_other_module_defines_an_exit_code() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "exits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {t.id}" for t in targets
                      if isinstance(t, ast.Name) and CODE_NAME.match(t.id)]
    assert not found, "exit codes belong in pipeline/exits.py:\n" + "\n".join(found)


def _imported(module: str) -> list[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    return imported + [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]


def test_exits_imports_only_the_error_line_helper_and_no_torch() -> None:
    """The CLI learns a code without importing torch: exits.py takes only `pipeline.errors` (for the transports'
    one-line messages), which imports nothing of the package."""
    imported = _imported("exits")
    assert [name for name in imported if name and name.split(".")[0] in ("pipeline", "torch")] == [
        "pipeline.errors"], imported
    assert not [name for name in _imported("errors") if name and name.split(".")[0] in ("pipeline", "torch")]
