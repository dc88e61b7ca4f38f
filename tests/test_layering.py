"""The architecture's rules, read from the source (docs/architecture.md): core code never imports the
built-in plugins, modules import each other without cycles, and the run's driver stays in short functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "mixerdistill"
DRIVER = ["run.py", "training.py", "distributed/*.py"]  # the code that drives a run
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function; ``from package import module``
    counts as importing that module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def core_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in CORE.rglob("*.py")}
    return {
        name: {other for other in imported_modules(path) if other in modules and other != name}
        for name, path in modules.items()
    }


def test_core_never_imports_the_built_in_plugins():
    offenders = {
        module_name(path)
        for path in CORE.rglob("*.py")
        if any(name.split(".")[0] == "mixerdistill_plugins" for name in imported_modules(path))
    }
    assert not offenders, f"core modules importing mixerdistill_plugins: {sorted(offenders)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other, path + [other])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_cycles_in_the_core():
    graph = core_graph()
    # A package's __init__ imported for a submodule is not a dependency on the package's other modules.
    for name in graph:
        graph[name] = {other for other in graph[name] if not name.startswith(other + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, " → ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def function_lengths(path: Path) -> dict[str, int]:
    return {
        f"{path.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_run_driver_functions_are_short():
    lengths = {
        name: lines
        for pattern in DRIVER
        for path in CORE.glob(pattern)
        for name, lines in function_lengths(path).items()
    }
    longest = max(lengths, key=lengths.get)
    print(f"longest: {longest}, {lengths[longest]} lines")
    too_long = {name: lines for name, lines in lengths.items() if lines > MAX_FUNCTION_LINES}
    assert not too_long, too_long
