"""The package's layers, checked from its imports (read with ast; nothing is imported).

Floors, bottom up: the ground floor (`GROUND_FLOOR`: errors, exits, the run folder's file names), which imports
nothing but itself; the core (config, data, models, training, checkpointing, distributed, tracking, evaluation);
the run layer `pipeline.run` (set-up and opening a finished run: only commands use it); the command layer
`pipeline.commands`. No module imports a floor above its own; a command uses another command only through the names
in that command's `__all__` (the dispatcher `pipeline.commands.cli` may use anything); and no modules import each
other in a circle. Every import counts: module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
COMMANDS = "pipeline.commands"
DISPATCHER = "pipeline.commands.cli"
ENTRY = {"pipeline.__main__"}
"""`python -m pipeline`: starts the dispatcher, as the console script does."""
RUN = "pipeline.run"
GROUND_FLOOR = {"pipeline.errors", "pipeline.exits", "pipeline.run_folder"}
"""Modules every floor may import: they import nothing of the package but each other (no torch either)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = package_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for each import in module `name` that names a package module.

    `from a.b import c` is an import of module a.b.c when that is a module, else of name c from a.b.
    """
    found = []
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = name if is_package(name) else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.append((f"{base}.{alias.name}", "", node.lineno))
                elif base in MODULES:
                    found.append((base, alias.name, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in imports(name) if target != name} for name in MODULES}


def is_command(name: str) -> bool:
    return name == COMMANDS or name.startswith(COMMANDS + ".")


def command_of(name: str) -> str:
    """The command a module belongs to: pipeline.commands.tune.study -> pipeline.commands.tune."""
    return ".".join(name.split(".")[:3])


def public_names(command: str) -> set[str]:
    """The `__all__` of a command's module (or its package's __init__): what other commands may import."""
    tree = ast.parse(MODULES[command].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def is_run_layer(name: str) -> bool:
    return name == RUN or name.startswith(RUN + ".")


def ground_floor_imports() -> list[str]:
    return [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: ground-floor module {name} imports {target}"
            for name in sorted(GROUND_FLOOR) for target, _, line in imports(name) if target not in GROUND_FLOOR]


def run_layer_imports() -> list[str]:
    return [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: core module {name} imports {target}"
            for name in MODULES if not is_command(name) and not is_run_layer(name) and name not in ENTRY
            for target, _, line in imports(name) if is_run_layer(target)]


def upward_imports() -> list[str]:
    return [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: core module {name} imports {target}"
            for name in MODULES if not is_command(name) and name not in ENTRY
            for target, _, line in imports(name) if is_command(target)]


def cross_command_imports() -> list[str]:
    wrong = []
    for name in MODULES:
        if not is_command(name) or name in (COMMANDS, DISPATCHER):
            continue
        for target, imported, line in imports(name):
            if not is_command(target) or command_of(target) == command_of(name):
                continue
            where = f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name}"
            if target != command_of(target) or not imported:
                wrong.append(f"{where} imports {target}, inside another command (use a name in its __all__)")
            elif imported not in public_names(target):
                wrong.append(f"{where} imports {imported} from {target}, which is not in its __all__")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:  # the package is small: recursion depth is far below the limit
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [circle_in(component, edges) for component in components]


def circle_in(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, staying inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle in {component}")


def test_the_walk_sees_module_and_function_level_imports() -> None:
    dispatcher = {target for target, _, _ in imports(DISPATCHER)}
    assert "pipeline.commands.train" in dispatcher  # imported inside _train
    assert "pipeline.config" in dispatcher
    assert "pipeline.distributed" in {target for target, _, _ in imports("pipeline.checkpointing.checkpointer")}
    assert len(MODULES) > 60


def test_no_core_module_imports_a_command() -> None:
    wrong = upward_imports()
    assert not wrong, "the core must not import the command layer:\n" + "\n".join(wrong)


def test_the_ground_floor_imports_only_itself() -> None:
    wrong = ground_floor_imports()
    assert not wrong, "the ground floor imports nothing above it:\n" + "\n".join(wrong)


def test_no_core_module_imports_the_run_layer() -> None:
    wrong = run_layer_imports()
    assert not wrong, "the core must not import the run layer:\n" + "\n".join(wrong)
    assert "pipeline.run.guards" in MODULES and is_run_layer("pipeline.run.guards")  # the check looks


def test_distributed_does_not_import_training() -> None:
    wrong = [f"{name} imports {target}" for name in MODULES if name.startswith("pipeline.distributed")
             for target, _, _ in imports(name) if target.startswith("pipeline.training")]
    assert not wrong, "pipeline.distributed sits below the training loop:\n" + "\n".join(wrong)


def test_commands_use_only_each_others_public_names() -> None:
    wrong = cross_command_imports()
    assert not wrong, "a command uses another only through that command's __all__:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)


def test_the_cycle_finder_finds_a_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(edges) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


PRIVATE_STORAGE = ("_typed_storage", "_new_shared", "_storage_Use_Count", "_cdata")
"""torch's private storage calls: used in `pipeline.data.samples.memory` only, where each has a public fallback."""


def private_storage_uses() -> list[str]:
    found = []
    for name, path in MODULES.items():
        if name == "pipeline.data.samples.memory":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            used = getattr(node, "attr", None) or (node.value if isinstance(node, ast.Constant) else None)
            if used in PRIVATE_STORAGE:  # torch._C._x, or getattr(torch._C, "_x")
                found.append(f"{name}:{node.lineno} uses {used}")
    return found


def test_private_torch_storage_calls_only_in_memory() -> None:
    wrong = private_storage_uses()
    assert not wrong, "private torch storage calls belong in pipeline.data.samples.memory:\n" + "\n".join(wrong)
    assert any(a in MODULES["pipeline.data.samples.memory"].read_text() for a in PRIVATE_STORAGE)  # the check looks


# ---- inside pipeline.data: layers by concept ----------------------------------------------------------------------
DATA = "pipeline.data"
DATA_LAYERS = {"io": 0, "dataset": 1, "samples": 2, "plan": 3, "workers": 3, "stream": 4, "balance": 4, "loader": 5,
               "loader_state": 5}
"""Each concept of the data package and its floor: transport (io) below what the shards are (dataset) below sample
processing (samples) below the stream: the epoch plan and the worker processes, then the stream (and its resampling
variant), then the loader that builds it. A module imports its own floor or lower ones."""
WRITER_USES = {"io", "dataset", "samples", "writer"}
"""The shard writer stands beside the reader: it uses transport and the dataset description, and checks each image as
the loader will (`samples.images`, `samples.faults`'s rules live there); never the stream."""
PRIVATE_IMPORTS_LEFT = {("pipeline.commands.tune.config", "pipeline.config.loader", "_parse_overrides")}
"""Private names imported across modules outside pipeline.data, left to their owners (issue 31)."""


def data_concept(name: str) -> str | None:
    """The concept a module of pipeline.data belongs to (its sub-package or top module), None for the face."""
    if not name.startswith(DATA + "."):
        return None
    return name.split(".")[2]


def data_layer_violations() -> list[str]:
    wrong = []
    for name in MODULES:
        concept = data_concept(name)
        if concept is None:
            continue
        for target, _, line in imports(name):
            other = data_concept(target)
            if target == DATA:
                wrong.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} imports the package face "
                             f"{DATA} (import the module that defines the name)")
            if other is None or other == concept:
                continue
            where = f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} ({concept}) imports {target} ({other})"
            if concept == "writer":
                if other not in WRITER_USES:
                    wrong.append(f"{where}: the writer uses only {sorted(WRITER_USES)}")
            elif other == "writer":
                wrong.append(f"{where}: only the writer's commands use the writer")
            elif DATA_LAYERS[other] > DATA_LAYERS[concept]:
                wrong.append(f"{where}: a lower floor imports a higher one")
    return wrong


def private_imports() -> set[tuple[str, str, str]]:
    """(importer, module, name) for each import of an underscore name from another module of the package."""
    return {(name, target, imported) for name in MODULES for target, imported, _ in imports(name)
            if imported.startswith("_") and not imported.startswith("__") and target != name}


def test_every_data_module_has_a_concept_with_a_floor() -> None:
    concepts = {data_concept(name) for name in MODULES} - {None}
    assert concepts <= set(DATA_LAYERS) | {"writer"}, concepts - set(DATA_LAYERS) - {"writer"}


def test_data_layers_import_downwards_only() -> None:
    wrong = data_layer_violations()
    assert not wrong, "inside pipeline.data, io < dataset < samples < plan/stream/loader:\n" + "\n".join(wrong)


def test_the_data_layer_check_sees_an_upward_import() -> None:
    assert DATA_LAYERS["io"] < DATA_LAYERS["dataset"] < DATA_LAYERS["samples"] < DATA_LAYERS["stream"]
    assert data_concept("pipeline.data.io.remote") == "io" and data_concept("pipeline.data.loader") == "loader"
    assert data_concept("pipeline.data") is None


def test_no_module_imports_a_private_name_of_another() -> None:
    found = private_imports()
    inside_data = sorted(f"{a} imports {n} from {m}" for a, m, n in found if a.startswith(DATA + ".")
                         or m.startswith(DATA + "."))
    assert not inside_data, "private names stay in their module:\n" + "\n".join(inside_data)
    assert found <= PRIVATE_IMPORTS_LEFT, "private names stay in their module:\n" + "\n".join(
        f"{a} imports {n} from {m}" for a, m, n in sorted(found - PRIVATE_IMPORTS_LEFT))


EXITS = "pipeline.exits"


def exit_code_definitions() -> list[str]:
    """Where a module other than `pipeline.exits` defines an exit code: a module-level `EXIT_* = ...`, or a class
    body that sets `exit_code` (an exception that carries one)."""
    found = []
    for name, path in MODULES.items():
        if name == EXITS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                found += [f"{name}:{item.lineno}: class {node.name} sets exit_code" for item in node.body
                          if isinstance(item, ast.Assign) and any(getattr(t, "id", "") == "exit_code"
                                                                  for t in item.targets)]
        found += [f"{name}:{node.lineno}: defines {target.id}" for node in tree.body if isinstance(node, ast.Assign)
                  for target in node.targets if getattr(target, "id", "").startswith("EXIT_")]
    return found


def test_exit_codes_and_the_exceptions_that_carry_them_are_defined_in_exits_only() -> None:
    found = exit_code_definitions()
    assert not found, "exit codes and the exceptions that carry them live in pipeline/exits.py:\n" + "\n".join(found)


def test_the_exit_code_check_sees_a_definition(tmp_path, monkeypatch) -> None:
    stray = tmp_path / "stray.py"
    stray.write_text("EXIT_OTHER = 3\n\nclass Other(Exception):\n    exit_code = 3\n")
    monkeypatch.setitem(MODULES, "pipeline.stray", stray)
    assert exit_code_definitions() == ["pipeline.stray:4: class Other sets exit_code",
                                       "pipeline.stray:1: defines EXIT_OTHER"]


TESTS = PACKAGE.parent / "tests"
SHARED_TEST_MODULES = ("tests.support", "tests.conftest", "tests.services")
"""What a test module may import of tests/: the shared helpers, the fixtures, the test services."""


def cross_test_imports(root: Path = TESTS) -> list[str]:
    """Imports of one test module's names by another: helpers shared by tests live in tests/support."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
            names = [target] if target else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            found += [f"{path.relative_to(root.parent)}:{node.lineno}: imports {name}" for name in names
                      if name.split(".")[0] == "tests" and name != "tests"
                      and not name.startswith(SHARED_TEST_MODULES)]
    return found


def test_no_test_module_imports_another_test_module() -> None:
    found = cross_test_imports()
    assert not found, "helpers shared by tests live in tests/support:\n" + "\n".join(found)


def test_the_cross_test_check_sees_one(tmp_path: Path) -> None:
    (tmp_path / "tests" / "data").mkdir(parents=True)
    (tmp_path / "tests" / "data" / "test_b.py").write_text(
        "from tests.data.test_a import helper\nfrom tests.support.x import y\nimport tests.test_c\n")
    assert cross_test_imports(tmp_path / "tests") == ["tests/data/test_b.py:1: imports tests.data.test_a",
                                                      "tests/data/test_b.py:3: imports tests.test_c"]
