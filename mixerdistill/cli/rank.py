"""``mixerdistill rank-layers``: what replacing each teacher layer alone costs (docs/hybrids.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mixerdistill.cli import app
from mixerdistill.cli.run import SET_HELP
from mixerdistill.console import stderr_console


@app.command("rank-layers")
def rank_layers_command(
    recipe_path: Path = typer.Argument(
        ..., metavar="RECIPE", help="Recipe YAML (teacher, student.mixer, data, ranking)."
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="Directory for ranking.json/.md/.png (default: runs/<name>_ranking)."
    ),
    measures: list[str] = typer.Option(
        ["stage2", "stage1", "kl", "ppl"],
        "--measure",
        help="A measure to take (repeat the option): stage1, stage2 (cheapest: one teacher pass for all "
        "layers), kl, ppl (a forward per layer). Default: all four.",
    ),
    layers: list[int] = typer.Option(None, "--layer", help="Rank only this layer (repeat the option); default: all."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Recompute every layer (default: reuse the cached ones) and replace OUTPUT's files."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
):
    """Rank the teacher's layers by the cost of replacing each one alone with the recipe's mixer."""
    import torch

    from mixerdistill.device import pick_device
    from mixerdistill.errors import UserError
    from mixerdistill.ranking import RANKING_FILE, load_models, rank_layers, ranking_key, render_markdown, write_outputs
    from mixerdistill.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    directory = Path(output or Path("runs") / f"{recipe.name}_ranking")
    previous = directory / RANKING_FILE
    if previous.is_file() and not overwrite and json.loads(previous.read_text()).get("key") != ranking_key(recipe):
        raise UserError(
            f"{previous} holds a ranking of other settings: choose another --output or pass --overwrite to replace it"
        )
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    models = load_models(recipe, pick_device(recipe.device), progress)
    result = rank_layers(
        recipe, models, list(dict.fromkeys(measures)), layers or None, fresh=overwrite, show_progress=progress
    )
    write_outputs(result, directory)
    typer.echo(render_markdown(result))
    stderr_console.print(f"[bold]wrote[/] {directory}/ranking.json, ranking.md, ranking.png (cache: {result['cache']})")
