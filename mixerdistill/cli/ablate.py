"""``mixerdistill ablate``: compare mixer families by their stage-1 distance to attention."""

from __future__ import annotations

from pathlib import Path

import typer

from mixerdistill.cli import app
from mixerdistill.cli.run import SET_HELP
from mixerdistill.console import stderr_console


@app.command("ablate")
def ablate_command(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE", help="Recipe YAML with an `ablation` list."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Directory (default: output.dir of the recipe, else runs/<name>)."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo families already run in OUTPUT (default: resume them)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Run the recipe once per `ablation` family; table and bar chart of the per-layer stage-1 distances."""
    from mixerdistill.ablation import render_table, run_ablation
    from mixerdistill.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    directory = Path(output or recipe.output.dir or Path("runs") / recipe.name)
    result = run_ablation(recipe, directory, overwrite=overwrite, show_progress=progress)
    typer.echo(render_table(result))
    stderr_console.print(f"[bold]wrote[/] {directory}/ablation.json, ablation.md")
