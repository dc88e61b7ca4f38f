"""report.md: the run's figures as tables a person can read at a glance."""

from __future__ import annotations

import json
from pathlib import Path

from mixerdistill.errors import UserError

PLOTS = {"loss.png": "Training loss per stage", "layer_distances.png": "Per-layer distances, start and end of stage"}
EVAL_FILE = "eval.json"
MOHAWK_STAGES = {"matrix_orientation": "1", "hidden_state_alignment": "2", "knowledge_distillation": "3"}


def format_number(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return f"{value:,}"


def render_report(report: dict) -> str:
    teacher, student = report["teacher"], report["student"]
    lines = [f"# Run report: {report.get('recipe', '')}", ""]
    mixers = ", ".join(f"{count} × {name}" for name, count in student.get("mixers", {}).items())
    lines += [f"Student: {mixers} ({format_number(student.get('parameters'))} parameters); "
              f"teacher: {teacher.get('adapter')} ({format_number(teacher.get('parameters'))} parameters).", ""]
    lines += ["## Held-out perplexity", "", "| model | perplexity | × teacher |", "|---|---:|---:|"]
    reference = teacher.get("perplexity")

    def row(label, value):
        ratio = value / reference if value is not None and reference else None
        lines.append(f"| {label} | {format_number(value)} | {format_number(ratio)} |")

    row("teacher", reference)
    row("student after weight transfer", student.get("perplexity_after_transfer"))
    for stage in report.get("stages", []):
        row(f"student after stage {stage['index']} ({stage['name']})", stage.get("perplexity_after"))
    row("**student (final)**", student.get("perplexity"))
    if student.get("domains"):  # issue 21: the unseen-domain table
        from mixerdistill.domains import domain_markdown

        lines += ["", "## Unseen domains (never trained on)", "",
                  *domain_markdown(student["domains"], student.get("domain_ratio_geomean"))]
    lines += ["", "## Stages", "",
              "| # | stage | steps | tokens | seconds | tokens/s | loss first | loss last |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for stage in report.get("stages", []):
        lines.append(f"| {stage['index']} | {stage['name']} | {format_number(stage['steps'])} | {format_number(stage['tokens'])} "
                     f"| {format_number(stage['seconds'], 1)} | {format_number(stage['tokens_per_second'], 0)} "
                     f"| {format_number(stage['loss_first'], 4)} | {format_number(stage['loss_last'], 4)} |")
    curve = report.get("curve")
    if curve:
        domains = list(dict.fromkeys(name for p in curve for name in p.get("domains", {})))  # issue 21
        lines += ["", "## Held-out perplexity during training", "",
                  "| training tokens | stage | perplexity |" + "".join(f" {name} |" for name in domains),
                  "|---:|---:|---:|" + "---:|" * len(domains)]
        lines += [f"| {format_number(p['tokens'])} | {p['stage_index']} | {format_number(p['perplexity'])} |"
                  + "".join(f" {format_number(p.get('domains', {}).get(name))} |" for name in domains)
                  for p in curve]
    evaluation = report.get("eval")
    if evaluation:
        from mixerdistill.harness import comparison_markdown

        limit = f", limit {evaluation['limit']}" if evaluation.get("limit") is not None else ""
        lines += ["", "## lm-eval", "", f"Tasks {', '.join(evaluation['tasks'])}{limit}.", ""]
        lines += comparison_markdown(evaluation)
    plots = [name for name in PLOTS if name in report.get("plots", [])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{PLOTS[name]}]({name})" for name in plots]
    samples = report.get("samples")
    if samples:
        lines += ["", "## Greedy continuation", "", f"Prompt: `{samples['prompt']}`", "",
                  "| model | continuation |", "|---|---|"]
        for who in ("teacher", "student"):
            text = samples[who].replace("|", "\\|").replace("\n", " ⏎ ")
            lines.append(f"| {who} | {text} |")
    if "seconds" in report:
        lines += ["", f"Total wall time: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def write_report_markdown(path: Path, report: dict) -> None:
    from mixerdistill.checkpoint import write_text_atomic

    write_text_atomic(path, render_report(report))


# -- comparing runs ----------------------------------------------------------------------------
def summarise_run(directory: Path) -> dict:
    """A run's headline figures: perplexities, tokens, time, and lm-eval scores (report.json's ``eval``,
    updated by a later ``mixerdistill eval`` into eval.json)."""
    directory = Path(directory)
    try:
        report = json.loads((directory / "report.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{directory} has no readable report.json: {error}") from None
    scores = {"student": {}, "teacher": {}}
    for entry in (report.get("eval"), _read_json(directory / EVAL_FILE)):
        for who in scores:
            for task, values in ((entry or {}).get(who) or {}).get("scores", {}).items():
                scores[who][task] = values
    stages = report.get("stages", [])
    return {"run": str(directory), "recipe": report.get("recipe"),
            "stages": [stage["name"] for stage in stages],
            "teacher_perplexity": report.get("teacher", {}).get("perplexity"),
            "student_perplexity": report.get("student", {}).get("perplexity"),
            "training_tokens": sum(stage["tokens"] for stage in stages),
            "training_seconds": round(sum(stage["seconds"] for stage in stages), 2),
            "seconds": report.get("seconds"), "eval": scores,
            **_domain_summary(report.get("student", {}), _read_json(directory / EVAL_FILE))}


def _domain_summary(student: dict, evaluated: dict | None) -> dict:
    """issue 21: student/teacher perplexity per unseen domain, from report.json or else eval.json."""
    source = student if student.get("domains") else (evaluated or {})
    return {"domain_ratios": {name: row["ratio"] for name, row in source.get("domains", {}).items()},
            "domain_ratio_geomean": source.get("domain_ratio_geomean")}


def comparison_table(summaries: list[dict]) -> tuple[list[str], list[tuple[str, list]]]:
    """(column labels, rows of (name, one value per run)) for ``mixerdistill compare``."""
    labels = [s["run"] for s in summaries]
    rows = [("stages", [" + ".join(MOHAWK_STAGES.get(name, name) for name in s["stages"]) or "none"
                        for s in summaries])]
    rows += [(name.replace("_", " "), [s[name] for s in summaries])
             for name in ("teacher_perplexity", "student_perplexity", "training_tokens", "training_seconds",
                          "seconds")]
    domains = dict.fromkeys(name for s in summaries for name in s.get("domain_ratios", {}))  # issue 21
    rows += [(f"× teacher: {name}", [s.get("domain_ratios", {}).get(name) for s in summaries]) for name in domains]
    if domains:
        rows.append(("× teacher: geometric mean", [s.get("domain_ratio_geomean") for s in summaries]))
    for who in ("student", "teacher"):
        keys = dict.fromkeys((task, metric) for s in summaries for task, values in s["eval"][who].items()
                             for metric in values)
        rows += [(f"{who}: {task} {metric}", [s["eval"][who].get(task, {}).get(metric) for s in summaries])
                 for task, metric in keys]
    return labels, rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
