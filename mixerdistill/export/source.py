"""The standalone source of an exported model: mixerdistill's own modules, rewritten to need only torch and
transformers.

Starting from the modules that define a student's mixer class (and ``mixerdistill.mixer_layer``), every
``mixerdistill`` / ``mixerdistill_plugins`` module they import (and every module of a third-party mixer's own
package) is collected, transitively, and each becomes one
flat file of the exported folder (``mixerdistill.ops.ssd`` → ``mixerdistill_ops_ssd.py``) with its imports
made relative (``from .mixerdistill_ops_ssd import ssd``), which transformers' remote-code loader follows.
What only the framework needs is cut out on the way:

- imports of ``mixerdistill.hookspecs`` and ``pydantic``, and functions decorated with ``@hookimpl``
  (plugin registration);
- pydantic config classes: top-level classes deriving from ``MixerConfig`` / ``BaseModel``, a mixer's nested
  ``class Config`` and the ``Config: ClassVar[...]`` declaration (the exported model gets the validated
  options as plain attributes).

So a new mixer joins exports by the same mechanism as the built-in ones: its module must import only the
standard library, torch, transformers and other modules that follow this rule (GPU packages lazily, through
``mixerdistill.ops.kernels``). ``ExportError`` names the offending import otherwise.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path

from mixerdistill.errors import UserError

PACKAGES = ("mixerdistill", "mixerdistill_plugins")
# registration, the plugin registry and recipe validation only
DROPPED_IMPORTS = ("mixerdistill.hookspecs", "mixerdistill.plugins", "pydantic", "pydantic_core")
CONFIG_BASES = {"MixerConfig", "BaseModel"}
ALLOWED_TOP_LEVEL = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)


class ExportError(UserError):
    """A module cannot be exported: it imports something an exported model does not have."""


def flat_name(module: str) -> str:
    """``mixerdistill.ops.ssd`` → ``mixerdistill_ops_ssd``: a module's file name (without .py) in an export."""
    return module.replace(".", "_")


def _ours(module: str | None, packages: tuple[str, ...] = PACKAGES) -> bool:
    return module is not None and module.split(".")[0] in packages


def _dropped(module: str | None) -> bool:
    return module is not None and any(module == d or module.startswith(d + ".") for d in DROPPED_IMPORTS)


def _is_config_class(node: ast.AST) -> bool:
    if not isinstance(node, ast.ClassDef):
        return False
    bases = {ast.unparse(base).split(".")[-1] for base in node.bases}
    return node.name == "Config" or bool(bases & CONFIG_BASES)


def _is_hookimpl(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and any(
        ast.unparse(d).split(".")[-1] == "hookimpl" for d in node.decorator_list
    )


def _first_line(node: ast.stmt) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def _module_path(module: str, packages: tuple[str, ...] = PACKAGES) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not _ours(module, packages):
        raise ExportError(f"cannot export {module}: not a module of {' or '.join(packages)}")
    return Path(spec.origin)


def _dropped_statements(tree: ast.Module) -> list[ast.stmt]:
    """Top-level and class-level statements an export leaves out: config classes and declarations, hookimpls."""
    dropped = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef)):
            for child in node.body:
                config_declaration = (
                    isinstance(child, ast.AnnAssign)
                    and isinstance(child.target, ast.Name)
                    and child.target.id == "Config"
                )
                if _is_config_class(child) or _is_hookimpl(child) or config_declaration:
                    dropped.append(child)
    return dropped


@functools.cache
def _dropped_names(module: str, packages: tuple[str, ...]) -> frozenset[str]:
    """Names of ``module``'s top-level statements that an export leaves out (so importers drop them too)."""
    tree = ast.parse(_module_path(module, packages).read_text())
    return frozenset(node.name for node in _dropped_statements(tree) if node in tree.body and hasattr(node, "name"))


def rewrite_module(module: str, packages: tuple[str, ...] = PACKAGES) -> tuple[str, list[str]]:
    """(standalone source of ``module``, the modules of ``packages`` it imports).

    ``packages``: the top-level packages whose modules are exported too (mixerdistill's, and a third-party
    mixer's own). Raises ExportError for a module outside them, or one importing another package than torch,
    transformers and the standard library.
    """
    path = _module_path(module, packages)
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines), filename=str(path))
    edits: dict[int, tuple[int, str | None]] = {}  # first line → (last line, replacement or None to drop)
    imports: list[str] = []
    for node in _dropped_statements(tree):
        edits[_first_line(node)] = (node.end_lineno, None)
    dropped_lines = {line for first, (last, _) in edits.items() for line in range(first, last + 1)}

    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in dropped_lines:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _ours(alias.name, packages) or alias.name.split(".")[0] not in ALLOWED_TOP_LEVEL:
                    raise ExportError(
                        f"{path}:{node.lineno}: `import {alias.name}` cannot be exported; use "
                        f"`from {alias.name} import …` for mixerdistill modules"
                    )
        elif node.level:
            raise ExportError(f"{path}:{node.lineno}: relative imports are not supported in exported modules")
        elif _dropped(node.module):
            edits[node.lineno] = (node.end_lineno, None)
        elif _ours(node.module, packages):
            imports.append(node.module)
            names = [alias for alias in node.names if alias.name not in _dropped_names(node.module, packages)]
            indent = lines[node.lineno - 1][: node.col_offset]
            relative = ast.ImportFrom(module=flat_name(node.module), names=names, level=1)
            edits[node.lineno] = (node.end_lineno, indent + ast.unparse(relative) if names else None)
        elif node.module.split(".")[0] not in ALLOWED_TOP_LEVEL:
            raise ExportError(
                f"{path}:{node.lineno}: imports {node.module}; an exported model has only "
                f"torch and transformers (import GPU packages through mixerdistill.ops.kernels)"
            )

    kept: list[str] = [f"# Exported from {module} by `mixerdistill export`; framework-only parts removed."]
    number = 1
    while number <= len(lines):
        if number in edits:
            last, replacement = edits[number]
            if replacement is not None:
                kept.append(replacement)
            number = last + 1
        else:
            kept.append(lines[number - 1])
            number += 1
    source = "\n".join(kept).rstrip() + "\n"
    compile(source, f"{flat_name(module)}.py", "exec")  # a cut that broke the syntax fails here, not on load
    return source, imports


def export_sources(modules: list[str]) -> dict[str, str]:
    """{file name: source} for ``modules`` and every module of theirs or mixerdistill's they import,
    transitively (a third-party mixer's package is exported with it)."""
    packages = tuple(dict.fromkeys([*PACKAGES, *(module.split(".")[0] for module in modules)]))
    files: dict[str, str] = {}
    queue = list(modules)
    while queue:
        module = queue.pop()
        name = f"{flat_name(module)}.py"
        if name in files:
            continue
        files[name], imported = rewrite_module(module, packages)
        queue += imported
    return dict(sorted(files.items()))
