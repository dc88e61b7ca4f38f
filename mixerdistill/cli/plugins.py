"""``mixerdistill plugins``: what is loaded, from where, what each plugin registers, and what went wrong."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mixerdistill.cli import app
from mixerdistill.console import stdout_console
from mixerdistill.errors import UserError
from mixerdistill.plugins import KINDS, get_manager

PIPED_WIDTH = 10_000
"""Console width when stdout is not a terminal: tables are as wide as their content, never cut."""


@app.command("plugins")
def plugins_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    details: str = typer.Option(
        None,
        "--details",
        metavar="NAME",
        help="Show the Config fields of the mixer, stage or data source NAME (PACKAGE:NAME when two plugins claim it).",
    ),
):
    """List loaded plugins (package, version, source file, what each registers); exits 2 when two plugins
    claim one name."""
    manager = get_manager()
    console = stdout_console if stdout_console.is_terminal else Console(file=sys.stdout, width=PIPED_WIDTH)
    if details is not None:
        _print_details(console, details)
        return
    if as_json:
        print(json.dumps(manager.snapshot(), indent=2))
    else:
        table = Table(title="mixerdistill plugins")
        for column in ("plugin", "package", "version", "source", *KINDS):
            table.add_column(column, overflow="fold")
        for info in manager.plugins.values():
            table.add_row(
                info.name + ("" if info.builtin else " (third-party)"),
                info.distribution,
                info.version,
                info.source,
                *(", ".join(info.registers.get(kind, [])) for kind in KINDS),
            )
        console.print(table)
        for problem in manager.problems:
            what = problem.message if problem.reason == "failed" else "left out by MIXERDISTILL_PLUGINS"
            console.print(
                f"[yellow]not loaded:[/] {escape(problem.name)} ({escape(problem.distribution)}): {escape(what)}",
                highlight=False,
            )
    conflicts = [
        f"{registry.singular} '{name}' is registered by " + " and ".join(o.label for o in owners)
        for registry in manager.registries.values()
        for name, owners in registry.conflicts().items()
    ]
    if conflicts:
        raise UserError(
            "\n".join(conflicts) + "\nrecipes must name the package (PACKAGE:NAME), or leave one "
            "plugin out with MIXERDISTILL_PLUGINS"
        )


def _print_details(console: Console, name: str) -> None:
    """The Config fields of the thing registered as ``name``: the rows docs/recipes.md shows for built-ins."""
    from mixerdistill.reference import field_rows

    manager = get_manager()
    kinds = [kind for kind in KINDS if name in manager.registries[kind]]
    if not kinds:
        manager.registries["mixers"].get(name)  # raises the unknown-name error with its notes
    for kind in kinds:
        registry = manager.registries[kind]
        thing, owner = registry.get(name), registry.owner(name)
        doc = (thing.__doc__ or "").strip().splitlines()
        console.print(f"[bold]{registry.singular} {escape(name)}[/] from plugin {escape(owner.label)}", highlight=False)
        if doc:
            console.print(escape(doc[0]), highlight=False)
        config_cls = getattr(thing, "Config", None)
        if config_cls is None:
            console.print("(no Config: nothing to set in a recipe)")
            continue
        table = Table()
        for column in ("field", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for row in field_rows(config_cls):
            table.add_row(*(escape(cell.replace("\\|", "|")) for cell in row))
        console.print(table)
