"""The ``mixerdistill`` command line: one module per command group, user errors exit with code 2."""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from mixerdistill.console import stderr_console
from mixerdistill.errors import UserError
from mixerdistill.interrupt import Interrupted, exit_code
from mixerdistill.memory import return_freed_memory

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Distil a pretrained Transformer into subquadratic sequence mixers (MOHAWK).",
)

TRACEBACK_VARIABLE = "MIXERDISTILL_TRACEBACK"


@app.callback()
def _options(traceback: bool = typer.Option(False, "--traceback", help="Show full tracebacks of errors.")):
    if traceback:
        os.environ[TRACEBACK_VARIABLE] = "1"


def _register_commands() -> None:
    # each module adds its commands to `app`
    from mixerdistill.cli import ablate, bench, evaluate, export, generate, plugins, rank, run  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    return_freed_memory()
    _register_commands()
    try:
        app(args=argv, prog_name="mixerdistill", standalone_mode=True)
    except Interrupted as stop:  # `run` prints its own message, with the command that continues the run
        stderr_console.print(f"[bold yellow]{escape(str(stop))}[/]", highlight=False, soft_wrap=True)
        sys.exit(exit_code(stop.signum))
    except UserError as error:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        stderr_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)
