"""``mixerdistill plugins``: what is loaded and what each plugin registers."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mixerdistill.cli import app
from mixerdistill.console import stdout_console
from mixerdistill.plugins import KINDS, get_manager


@app.command("plugins")
def plugins_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List loaded plugins with their version and what each registers."""
    manager = get_manager()
    if as_json:
        payload = {
            "plugins": [{"name": info.name, "distribution": info.distribution, "version": info.version,
                         "builtin": info.builtin, "registers": info.registers}
                        for info in manager.plugins.values()],
            **{kind: manager.registries[kind].names() for kind in KINDS},
        }
        print(json.dumps(payload, indent=2))
        return
    table = Table(title="mixerdistill plugins")
    for column in ("plugin", "distribution", "version", *KINDS):
        table.add_column(column)
    for info in manager.plugins.values():
        table.add_row(info.name + ("" if info.builtin else " (third-party)"), info.distribution, info.version,
                      *(", ".join(info.registers.get(kind, [])) for kind in KINDS))
    stdout_console.print(table)
