"""report.md: the run's figures as tables a person can read at a glance."""

from __future__ import annotations

import json
from pathlib import Path

from mixerdistill.checkpoint import write_text_atomic
from mixerdistill.run_report import REPORT_FILE, RunReport

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


def render_report(report: RunReport) -> str:
    """report.md: the run's figures as Markdown tables."""
    teacher, student = report.teacher, report.student
    lines = [f"# Run report: {report.recipe}", ""]
    mixers = ", ".join(f"{count} × {name}" for name, count in student.mixers.items())
    lines += [
        f"Student: {mixers} ({format_number(student.parameters)} parameters); "
        f"teacher: {teacher.adapter} ({format_number(teacher.parameters)} parameters).",
        "",
    ]
    if student.keep_attention:
        chosen = (
            f", the layers costliest to replace by {student.keep_attention_by}" if student.keep_attention_by else ""
        )
        lines += [f"Attention kept in layers {', '.join(map(str, student.keep_attention))}{chosen}.", ""]
    lines += _perplexity_table(report)
    if student.domains:
        lines += [
            "",
            "## Unseen domains (never trained on)",
            "",
            *domain_markdown(student.domains, student.domain_ratio_geomean),
        ]
    lines += _stage_table(report) + _curve_table(report)
    evaluation = report.eval
    if evaluation:
        limit = f", limit {evaluation['limit']}" if evaluation.get("limit") is not None else ""
        lines += ["", "## lm-eval", "", f"Tasks {', '.join(evaluation['tasks'])}{limit}.", ""]
        lines += comparison_markdown(evaluation)
    plots = [name for name in PLOTS if name in (report.plots or [])]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{PLOTS[name]}]({name})" for name in plots]
    if report.samples:
        lines += [
            "",
            "## Greedy continuation",
            "",
            f"Prompt: `{report.samples.prompt}`",
            "",
            "| model | continuation |",
            "|---|---|",
        ]
        for who in ("teacher", "student"):
            text = getattr(report.samples, who).replace("|", "\\|").replace("\n", " ⏎ ")
            lines.append(f"| {who} | {text} |")
    if report.seconds is not None:
        memory = f"; peak resident memory {report.peak_rss_gb:.2f} GB" if report.peak_rss_gb else ""
        lines += ["", f"Total wall time: {report.seconds:.0f} s{memory}."]
    return "\n".join(lines) + "\n"


def write_report(report: RunReport, directory: Path) -> None:
    """report.json and report.md in ``directory`` (each replaced atomically)."""
    write_text_atomic(directory / REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")
    write_text_atomic(directory / "report.md", render_report(report))


def _perplexity_table(report: RunReport) -> list[str]:
    lines = ["## Held-out perplexity", "", "| model | perplexity | × teacher |", "|---|---:|---:|"]
    reference = report.teacher.perplexity
    rows = [("teacher", reference), ("student after weight transfer", report.student.perplexity_after_transfer)]
    rows += [(f"student after stage {stage.index} ({stage.name})", stage.perplexity_after) for stage in report.stages]
    rows.append(("**student (final)**", report.student.perplexity))
    for label, value in rows:
        ratio = value / reference if value is not None and reference else None
        lines.append(f"| {label} | {format_number(value)} | {format_number(ratio)} |")
    return lines


def _stage_table(report: RunReport) -> list[str]:
    lines = [
        "",
        "## Stages",
        "",
        "| # | stage | steps | tokens | seconds | tokens/s | loss first | loss last | peak RSS (GB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in report.stages:
        lines.append(
            f"| {stage.index} | {stage.name} | {format_number(stage.steps)} | {format_number(stage.tokens)} "
            f"| {format_number(stage.seconds, 1)} | {format_number(stage.tokens_per_second, 0)} "
            f"| {format_number(stage.loss_first, 4)} | {format_number(stage.loss_last, 4)} "
            f"| {format_number(stage.peak_rss_gb, 2)} |"
        )
    return lines


def domain_markdown(table: dict[str, dict], geomean: float | None) -> list[str]:
    """report.md lines: one row per domain and the geometric mean of the ratios."""
    lines = ["| domain | teacher | student | × teacher |", "|---|---:|---:|---:|"]
    lines += [
        f"| {name} | {format_number(row['teacher'])} | {format_number(row['student'])} "
        f"| {format_number(row['ratio'])} |"
        for name, row in table.items()
    ]
    lines.append(f"| **geometric mean** | | | **{format_number(geomean)}** |")
    return lines


def _curve_table(report: RunReport) -> list[str]:
    """Held-out perplexity during training, with a column per unseen domain when the run measures them."""
    if not report.curve:
        return []
    domains = list(dict.fromkeys(name for point in report.curve for name in (point.domains or {})))
    lines = [
        "",
        "## Held-out perplexity during training",
        "",
        "| training tokens | stage | perplexity |" + "".join(f" {name} |" for name in domains),
        "|---:|---:|---:|" + "---:|" * len(domains),
    ]
    lines += [
        f"| {format_number(p.tokens)} | {p.stage_index} | {format_number(p.perplexity)} |"
        + "".join(f" {format_number((p.domains or {}).get(name))} |" for name in domains)
        for p in report.curve
    ]
    return lines


def comparison_rows(entry: dict) -> list[dict]:
    """One row per (task, metric) of an lm-eval entry: teacher value, student value and student/teacher."""
    student = entry["student"]["scores"]
    teacher = (entry.get("teacher") or {}).get("scores", {})
    rows = []
    for task in student:
        for metric, value in student[task].items():
            reference = teacher.get(task, {}).get(metric)
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "teacher": reference,
                    "student": value,
                    "ratio": value / reference if reference else None,
                }
            )
    return rows


def comparison_markdown(entry: dict) -> list[str]:
    """The side-by-side lm-eval table as Markdown lines."""
    lines = ["| task | metric | teacher | student | student / teacher |", "|---|---|---:|---:|---:|"]
    for row in comparison_rows(entry):
        lines.append(
            f"| {row['task']} | {row['metric']} | {format_number(row['teacher'], 4)} "
            f"| {format_number(row['student'], 4)} | {format_number(row['ratio'], 3)} |"
        )
    return lines


# -- comparing runs ----------------------------------------------------------------------------
def summarise_run(directory: Path) -> dict:
    """A run's headline figures: perplexities, tokens, time, and lm-eval scores (report.json's ``eval``,
    updated by a later ``mixerdistill eval`` into eval.json)."""
    directory = Path(directory)
    report = RunReport.read(directory)
    scores = {"student": {}, "teacher": {}}
    for entry in (report.eval, _read_json(directory / EVAL_FILE)):
        for who in scores:
            for task, values in ((entry or {}).get(who) or {}).get("scores", {}).items():
                scores[who][task] = values
    return {
        "run": str(directory),
        "recipe": report.recipe,
        "stages": [stage.name for stage in report.stages],
        "teacher_perplexity": report.teacher.perplexity,
        "student_perplexity": report.student.perplexity,
        "training_tokens": sum(stage.tokens for stage in report.stages),
        "training_seconds": round(sum(stage.seconds for stage in report.stages), 2),
        "seconds": report.seconds,
        "eval": scores,
        **_domain_summary(report.student.model_dump(), _read_json(directory / EVAL_FILE)),
    }


def _domain_summary(student: dict, evaluated: dict | None) -> dict:
    """Student/teacher perplexity per unseen domain, from report.json or else eval.json."""
    source = student if student.get("domains") else (evaluated or {})
    return {
        "domain_ratios": {name: row["ratio"] for name, row in (source.get("domains") or {}).items()},
        "domain_ratio_geomean": source.get("domain_ratio_geomean"),
    }


def comparison_table(summaries: list[dict]) -> tuple[list[str], list[tuple[str, list]]]:
    """(column labels, rows of (name, one value per run)) for ``mixerdistill compare``."""
    labels = [s["run"] for s in summaries]
    rows = [
        ("stages", [" + ".join(MOHAWK_STAGES.get(name, name) for name in s["stages"]) or "none" for s in summaries])
    ]
    rows += [
        (name.replace("_", " "), [s[name] for s in summaries])
        for name in ("teacher_perplexity", "student_perplexity", "training_tokens", "training_seconds", "seconds")
    ]
    domains = dict.fromkeys(name for s in summaries for name in s.get("domain_ratios", {}))  # issue 21
    rows += [(f"× teacher: {name}", [s.get("domain_ratios", {}).get(name) for s in summaries]) for name in domains]
    if domains:
        rows.append(("× teacher: geometric mean", [s.get("domain_ratio_geomean") for s in summaries]))
    for who in ("student", "teacher"):
        keys = dict.fromkeys(
            (task, metric) for s in summaries for task, values in s["eval"][who].items() for metric in values
        )
        rows += [
            (f"{who}: {task} {metric}", [s["eval"][who].get(task, {}).get(metric) for s in summaries])
            for task, metric in keys
        ]
    return labels, rows


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
