"""``mixerdistill run`` and ``mixerdistill validate``."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer
from rich.markup import escape

from mixerdistill.cli import app
from mixerdistill.console import stderr_console, stdout_console

SET_HELP = "Override a recipe field: dotted.path=value (YAML value; list items by index). Repeatable."


@app.command("validate")
def validate_command(
    recipes: list[Path] = typer.Argument(..., help="Recipe YAML files or built-in recipe names."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Check recipes against the schema; every problem is reported as a dotted YAML path."""
    from mixerdistill.errors import RecipeError, UserError
    from mixerdistill.recipe import load_recipe

    failed = []
    for path in recipes:
        try:
            load_recipe(path, overrides)
            stdout_console.print(f"[green]ok[/] {path}")
        except RecipeError as error:
            failed.append(str(error))
    if failed:
        raise UserError("\n".join(failed))


@app.command("run")
def run_command(
    recipe_path: Path = typer.Argument(
        ..., metavar="RECIPE", help="Recipe YAML file, or a built-in recipe's name (e.g. smollm2_mamba)."
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Run directory (default: output.dir of the recipe, else runs/<name>)."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT; finished stages are not redone."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in OUTPUT."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Run as N processes on this machine (torchrun; see docs/distributed.md)."
    ),
):
    """Distil a student as the recipe says: teacher → student → stages → report."""
    from mixerdistill.distributed.launcher import launch
    from mixerdistill.distributed.world import current_world, under_torchrun
    from mixerdistill.errors import UserError
    from mixerdistill.interrupt import RESUME_COMMAND_VARIABLE, Interrupted, exit_code
    from mixerdistill.recipe import load_recipe
    from mixerdistill.report import render_report
    from mixerdistill.run import execute

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    recipe = load_recipe(recipe_path, overrides)
    directory = output or recipe.output.dir or Path("runs") / recipe.name
    sets = [part for override in overrides for part in ("--set", override)]
    common = [str(recipe_path), "--output", str(directory), *sets]
    resume_command = ["mixerdistill", "run", *common, "--resume"] + ["--nproc", str(nproc)] * (nproc > 1)
    if nproc > 1:
        if under_torchrun():
            raise UserError("--nproc starts torchrun; this process already runs under torchrun: drop --nproc")
        flags = ["--resume"] * resume + ["--overwrite"] * overwrite + ["--no-progress"] * (not progress)
        launch(nproc, ["run", *common, *flags], resume_command=resume_command)
        return
    try:
        report = execute(recipe, Path(directory), resume=resume, overwrite=overwrite, show_progress=progress)
    except Interrupted as stop:
        if current_world().main:
            # Under `--nproc`, the launcher's command; under a torchrun of one's own, that command with --resume.
            command = os.environ.get(RESUME_COMMAND_VARIABLE) or shlex.join(resume_command) + (
                " (under torchrun: your torchrun command with --resume)" if under_torchrun() else ""
            )
            stderr_console.print(
                f"[bold yellow]{escape(str(stop))}[/] — continue with: {escape(command)}",
                highlight=False,
                soft_wrap=True,
            )
        raise typer.Exit(exit_code(stop.signum)) from None
    if not current_world().main:
        return
    typer.echo(render_report(report))
    stderr_console.print(f"[bold]wrote[/] {directory}/report.json, report.md, metrics.jsonl and checkpoints")
