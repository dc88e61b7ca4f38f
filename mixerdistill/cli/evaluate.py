"""``mixerdistill eval``, ``lm-eval``, ``compare`` and ``inspect``: judging distilled students."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.table import Table

from mixerdistill.cli import app
from mixerdistill.console import stderr_console, stdout_console


@app.command("eval")
def eval_command(
    target: Path = typer.Argument(
        ...,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="A run directory (its last stage is used) or a stage checkpoint folder.",
    ),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="Comma-separated lm-eval tasks or groups, e.g. austen_ppl,austen_cloze,austen_choice or arc_easy,piqa.",
    ),
    domains: str = typer.Option(
        None,
        "--domains",
        help="Perplexity of student and teacher on never-trained-on "
        "text: 'recipe' for the run recipe's eval.domains, or "
        "names, e.g. heldout,heldout_reflowed,pydoc.",
    ),
    limit: float = typer.Option(None, "--limit", min=0, help="Examples per task (below 1: a fraction)."),
    with_teacher: bool = typer.Option(False, "--with-teacher", help="Also score the teacher, same settings."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Requests per forward pass."),
    num_fewshot: int = typer.Option(None, "--num-fewshot", min=0, help="Few-shot examples (task default)."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu', 'cuda', 'cuda:1', …"),
    output: Path = typer.Option(
        None, "--output", "-o", help="Where to write the scores (default: eval.json in the run directory)."
    ),
):
    """Score a student (and its teacher) with lm-eval and/or on unseen domains; prints side-by-side tables,
    writes eval.json."""
    from mixerdistill.checkpoint import load_student, write_text_atomic
    from mixerdistill.device import pick_device
    from mixerdistill.errors import UserError
    from mixerdistill.harness import (
        EvalSettings,
        evaluate_pair,
        find_checkpoint,
        lm_eval_limit,
        load_teacher_of,
        load_tokenizer,
    )
    from mixerdistill.report import comparison_rows
    from mixerdistill.run_directory import RECIPE_FILE

    names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if not names and not domains:
        raise UserError("give --tasks (lm-eval tasks) and/or --domains")
    checkpoint = find_checkpoint(target)
    run_dir = checkpoint.parent if (checkpoint.parent / RECIPE_FILE).is_file() else checkpoint
    torch_device = pick_device(device)
    stderr_console.print(f"[bold]eval[/]: student from {checkpoint}")
    tokenizer = load_tokenizer(checkpoint)
    student, _ = load_student(checkpoint, torch_device)
    entry = {"checkpoint": str(checkpoint)}
    if names:
        teacher = load_teacher_of(checkpoint).to(torch_device) if with_teacher else None
        settings = EvalSettings(tasks=names, limit=lm_eval_limit(limit), batch_size=batch_size, num_fewshot=num_fewshot)
        entry.update(evaluate_pair(student, teacher, tokenizer, settings))
    if domains:  # issue 21: the unseen-domain table, as in report.md
        chosen = None if domains == "recipe" else [d.strip() for d in domains.split(",") if d.strip()]
        entry.update(measure_run_domains(run_dir, student, chosen, torch_device))
    path = output or run_dir / "eval.json"
    write_text_atomic(path, json.dumps(entry, indent=2) + "\n")
    if names:
        stdout_console.print(_scores_table(comparison_rows(entry), f"lm-eval: {checkpoint}"))
    if domains:
        stdout_console.print(_domain_table(entry, f"unseen domains: {checkpoint}"))
    stderr_console.print(f"[bold]wrote[/] {path}")


def _scores_table(rows: list[dict], title: str) -> Table:
    from mixerdistill.report import format_number

    table = Table(title=title)
    for column, justify in (
        ("task", "left"),
        ("metric", "left"),
        ("teacher", "right"),
        ("student", "right"),
        ("student / teacher", "right"),
    ):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(
            row["task"],
            row["metric"],
            format_number(row["teacher"], 4),
            format_number(row["student"], 4),
            format_number(row["ratio"], 3),
        )
    return table


def measure_run_domains(run_dir, student, names: list[str] | None, device, show_progress: bool = True) -> dict:
    """``mixerdistill eval --domains``: the domain table of a finished run's student, the domains being
    ``names`` (built-ins, or names of the recipe's file domains) or else its recipe's eval.domains; the
    teacher is measured beside it."""
    import yaml

    from mixerdistill.domains import BUILTIN_DOMAINS, DomainEvaluation, domain_table
    from mixerdistill.errors import UserError
    from mixerdistill.mixture import build_data
    from mixerdistill.recipe import validate_recipe
    from mixerdistill.run_directory import RECIPE_FILE
    from mixerdistill.teacher_sources import load_teacher

    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"--domains needs a run directory with its {RECIPE_FILE}; {run_dir} has none")
    raw = yaml.safe_load(path.read_text())
    if names:  # the recipe's own entry of that name (a file domain), else the built-in
        named = {e if isinstance(e, str) else e["name"]: e for e in raw["eval"].get("domains", [])}
        raw["eval"]["domains"] = [named.get(name, name) for name in names]
    recipe = validate_recipe(raw, source=f"{path} (with --domains)")
    if not recipe.eval.domains:
        raise UserError(
            f"the recipe in {run_dir} names no eval.domains: give them with --domains, e.g. "
            f"--domains {','.join(BUILTIN_DOMAINS)}"
        )
    teacher, tokenizer = load_teacher(recipe.teacher)
    teacher.to(device)
    data, sources = build_data(recipe.data, tokenizer, teacher, recipe.teacher.model_dump(mode="json"), show_progress)
    evaluation = DomainEvaluation.for_recipe(recipe, data, sources, tokenizer, teacher, device, show_progress)
    table, geomean = domain_table(evaluation.measure(teacher), evaluation.measure(student))
    return {
        "domains": table,
        "domain_ratio_geomean": geomean,
        "domain_tokens": recipe.eval.domain_tokens,
        "seq_len": recipe.eval.seq_len,
    }


def _domain_table(entry: dict, title: str) -> Table:
    from mixerdistill.report import format_number

    table = Table(title=title)
    for column, justify in (
        ("domain", "left"),
        ("teacher", "right"),
        ("student", "right"),
        ("student / teacher", "right"),
    ):
        table.add_column(column, justify=justify)
    for name, row in entry["domains"].items():
        table.add_row(name, format_number(row["teacher"]), format_number(row["student"]), format_number(row["ratio"]))
    table.add_row("geometric mean", "", "", format_number(entry["domain_ratio_geomean"]))
    return table


@app.command(
    "lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def lm_eval_command(context: typer.Context):
    """The full lm-eval command line with the `mixerdistill` model type and the offline tasks.

    Everything after `--` goes to lm-eval unchanged, e.g.
    `mixerdistill lm-eval -- run --model mixerdistill --model_args pretrained=runs/demo --tasks austen_cloze`.
    """
    from lm_eval._cli import HarnessCLI

    import mixerdistill.harness  # noqa: F401  (registers the `mixerdistill` model type)
    from mixerdistill.errors import UserError
    from mixerdistill.lm_tasks import austen_task_dir

    parser = HarnessCLI()
    saved, sys.argv = sys.argv, ["lm-eval", *context.args]
    try:
        arguments = parser.parse_args()
    finally:
        sys.argv = saved
    if hasattr(arguments, "include_path"):
        try:
            ours = str(austen_task_dir())
        except UserError as error:
            stderr_console.print(f"[yellow]warning:[/] the offline austen_* tasks are unavailable: {error}")
        else:
            arguments.include_path = [p for p in (arguments.include_path, ours) if p]
    parser.execute(arguments)


@app.command("compare")
def compare_command(
    runs: list[Path] = typer.Argument(..., help="Run directories."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """One table of perplexity, eval scores, tokens and time across runs (e.g. stage ablations)."""
    from mixerdistill.report import comparison_table, format_number, summarise_run

    summaries = [summarise_run(run) for run in runs]
    labels, rows = comparison_table(summaries)
    if as_json:
        print(json.dumps(summaries, indent=2))
        return
    table = Table(title="mixerdistill runs")
    table.add_column("")
    for label in labels:
        table.add_column(label, justify="right")
    for name, values in rows:
        table.add_row(name, *(format_number(v, 4 if isinstance(v, float) and abs(v) < 10 else 2) for v in values))
    stdout_console.print(table)


@app.command("inspect")
def inspect_command(
    run: Path = typer.Argument(..., metavar="RUN_DIR_OR_CHECKPOINT"),
    layer: int = typer.Option(..., "--layer", min=0, help="Layer index."),
    head: int = typer.Option(0, "--head", min=0, help="Head index."),
    tokens: int = typer.Option(64, "--tokens", min=2, help="Length of the held-out sequence."),
    output: Path = typer.Option(
        None, "--output", "-o", help="PNG to write (default: inspect_layer<L>_head<H>.png in the run directory)."
    ),
):
    """Draw the teacher's attention matrix beside the student's mixing matrix for one held-out sequence."""
    from mixerdistill.harness import find_checkpoint
    from mixerdistill.plots import inspect_mixing
    from mixerdistill.run_directory import RECIPE_FILE

    checkpoint = find_checkpoint(run)
    run_dir = checkpoint.parent if (checkpoint.parent / RECIPE_FILE).is_file() else checkpoint
    path = output or run_dir / f"inspect_layer{layer}_head{head}.png"
    distance = inspect_mixing(checkpoint, layer, head, tokens, path)
    stdout_console.print(f"layer {layer}, head {head}: ‖A_teacher − M_student‖_F = {distance:.4f} over {tokens} tokens")
    stderr_console.print(f"[bold]wrote[/] {path}")
