"""report.md: the run's figures as tables a person can read at a glance."""

from __future__ import annotations

from pathlib import Path


def _number(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return f"{value:,}"


def render_report(report: dict) -> str:
    teacher, student = report["teacher"], report["student"]
    lines = [f"# Run report: {report.get('recipe', '')}", ""]
    mixers = ", ".join(f"{count} × {name}" for name, count in student.get("mixers", {}).items())
    lines += [f"Student: {mixers} ({_number(student.get('parameters'))} parameters); "
              f"teacher: {teacher.get('adapter')} ({_number(teacher.get('parameters'))} parameters).", ""]
    lines += ["## Held-out perplexity", "", "| model | perplexity | × teacher |", "|---|---:|---:|"]
    reference = teacher.get("perplexity")

    def row(label, value):
        ratio = value / reference if value is not None and reference else None
        lines.append(f"| {label} | {_number(value)} | {_number(ratio)} |")

    row("teacher", reference)
    row("student after weight transfer", student.get("perplexity_after_transfer"))
    for stage in report.get("stages", []):
        row(f"student after stage {stage['index']} ({stage['name']})", stage.get("perplexity_after"))
    row("**student (final)**", student.get("perplexity"))
    lines += ["", "## Stages", "",
              "| # | stage | steps | tokens | seconds | tokens/s | loss first | loss last |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for stage in report.get("stages", []):
        lines.append(f"| {stage['index']} | {stage['name']} | {_number(stage['steps'])} | {_number(stage['tokens'])} "
                     f"| {_number(stage['seconds'], 1)} | {_number(stage['tokens_per_second'], 0)} "
                     f"| {_number(stage['loss_first'], 4)} | {_number(stage['loss_last'], 4)} |")
    curve = report.get("curve")
    if curve:
        lines += ["", "## Held-out perplexity during training", "", "| training tokens | stage | perplexity |",
                  "|---:|---:|---:|"]
        lines += [f"| {_number(p['tokens'])} | {p['stage_index']} | {_number(p['perplexity'])} |" for p in curve]
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
