"""The model card (README.md) of an exported student, written from its run: teacher, mixer, kept attention,
tokens per stage, perplexity of teacher and student, lm-eval scores, the recipe and the teacher's licence."""

from __future__ import annotations

import importlib.metadata
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mixerdistill.report import EVAL_FILE, format_number

LICENCE_FILE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "TERMS")


def read_run_report(run_dir: Path | None) -> dict:
    """The run's report.json as a dict ({} when the folder has none): the one place the card reads it."""
    if run_dir is None:
        return {}
    try:
        return json.loads((run_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Licence:
    """The teacher's licence: an identifier for the card's metadata, a sentence, and the licence text if found."""

    identifier: str  # lower-case SPDX-like id for the card's front matter, or "other" / "unknown"
    summary: str
    text: str | None = None  # copied into the export as LICENSE


def _front_matter_licence(readme: Path) -> str | None:
    try:
        match = re.search(r"^license:\s*(\S+)", readme.read_text(), flags=re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def _licence_text(folder: Path) -> str | None:
    for path in sorted(folder.glob("*")):
        if path.is_file() and path.name.upper().startswith(LICENCE_FILE_NAMES):
            return path.read_text(errors="replace")
    return None


def teacher_licence(teacher: dict) -> Licence:
    """The licence of the teacher a recipe's ``teacher`` block names, as far as it can be found offline."""
    source = teacher.get("source")
    if source == "config":
        return Licence("other", "none: the teacher was a randomly initialised model (no pretrained weights)")
    if source == "gguf_package":
        package = teacher["package"]
        try:
            meta = importlib.metadata.metadata(package)
        except importlib.metadata.PackageNotFoundError:
            return Licence("unknown", f"unknown: the teacher's package {package} is not installed here")
        identifier = meta.get("License-Expression") or meta.get("License") or "unknown"
        files = importlib.metadata.files(package) or []
        text = next((f.read_text() for f in files if f.name.upper().startswith(LICENCE_FILE_NAMES)), None)
        return Licence(identifier.lower(), f"{identifier}, carried over from the teacher (package {package})", text)
    if source == "local":
        folder = Path(teacher["path"])
        identifier = _front_matter_licence(folder / "README.md")
        text = _licence_text(folder)
        summary = f"{identifier or 'see the licence file'}, carried over from the teacher ({folder})"
        return Licence((identifier or "other").lower(), summary, text)
    name = teacher.get("name", "the teacher")
    return Licence("other", f"the licence of {name} applies (see its model card on the hub)")


def teacher_display_name(teacher: dict) -> str:
    """How the card names the teacher a recipe's ``teacher`` block describes."""
    source = teacher.get("source")
    if source == "gguf_package":
        return f"{teacher['file'].removesuffix('.gguf')} (GGUF from the pip package {teacher['package']})"
    if source == "config":
        return f"a random {teacher.get('model_type', '')} model built from a config"
    return str(teacher.get("name") or teacher.get("path"))


def _mixer_summary(mixer: str, options: dict, mixer_layers: dict, num_layers: int) -> list[str]:
    replaced = sorted(geometry["layer_idx"] for geometry in mixer_layers.values())
    kept = [i for i in range(num_layers) if i not in replaced]
    shown = {k: v for k, v in options.items() if v is not None}
    return [
        f"| mixer | `{mixer}` in {len(replaced)} of {num_layers} layers |",
        f"| kept attention layers | {', '.join(map(str, kept)) if kept else 'none (no attention left)'} |",
        f"| mixer options | {', '.join(f'{k}={v}' for k, v in shown.items())} |",
    ]


def _perplexity_lines(report: dict) -> list[str]:
    teacher, student = report.get("teacher", {}), report.get("student", {})
    if teacher.get("perplexity") is None and student.get("perplexity") is None:
        return []
    reference = teacher.get("perplexity")
    lines = [
        "## Perplexity",
        "",
        "Held-out text of the training domain (windows never trained on):",
        "",
        "| model | perplexity | × teacher |",
        "|---|---:|---:|",
    ]

    def row(label, value):
        ratio = value / reference if value is not None and reference else None
        lines.append(f"| {label} | {format_number(value)} | {format_number(ratio)} |")

    row("teacher", reference)
    row("student after weight transfer", student.get("perplexity_after_transfer"))
    for stage in report.get("stages", []):
        row(f"student after stage {stage['index']} ({stage['name']})", stage.get("perplexity_after"))
    row("**student (exported)**", student.get("perplexity"))
    domains = student.get("domains") or {}
    if domains:
        lines += [
            "",
            "Domains never trained on:",
            "",
            "| domain | teacher | student | student / teacher |",
            "|---|---:|---:|---:|",
        ]
        teacher_domains = teacher.get("domains") or {}
        for name, value in domains.items():
            pair = value if isinstance(value, dict) else {"student": value, "teacher": teacher_domains.get(name)}
            ratio = pair["student"] / pair["teacher"] if pair.get("student") and pair.get("teacher") else None
            lines.append(
                f"| {name} | {format_number(pair.get('teacher'))} | {format_number(pair.get('student'))} "
                f"| {format_number(ratio)} |"
            )
    return lines + [""]


def _lm_eval_lines(report: dict, run_dir: Path | None) -> list[str]:
    entry = (_read_json(run_dir / EVAL_FILE) if run_dir else None) or report.get("eval")
    if not entry or not (entry.get("student") or {}).get("scores"):
        return []
    from mixerdistill.report import comparison_markdown

    limit = f", limit {entry['limit']} examples per task" if entry.get("limit") is not None else ""
    return ["## lm-eval", "", f"Tasks {', '.join(entry.get('tasks', []))}{limit}.", "", *comparison_markdown(entry), ""]


def model_card(
    *,
    name: str,
    spec_teacher: dict,
    mixer: str,
    options: dict,
    mixer_layers: dict,
    num_layers: int,
    parameters: int,
    dtype: str,
    stage_folder: str,
    licence: Licence,
    report: dict,
    run_dir: Path | None,
) -> str:
    """README.md of an exported student (Markdown with Hugging Face front matter)."""
    teacher_name = teacher_display_name(spec_teacher)
    front = {
        "library_name": "transformers",
        "license": licence.identifier,
        "tags": ["mixerdistill", "distillation", "mohawk", mixer],
    }
    if spec_teacher.get("source") == "hub":
        front["base_model"] = spec_teacher["name"]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A subquadratic student distilled from **{teacher_name}** by "
        f"mixerdistill with the MOHAWK method (matrix orientation, hidden-state "
        f"alignment, knowledge distillation). Exported from `{stage_folder}`.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {teacher_name} (source: {spec_teacher.get('source')}) |",
        *_mixer_summary(mixer, options, mixer_layers, num_layers),
        f"| parameters | {parameters:,} |",
        f"| weights | {dtype} safetensors |",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True, dtype=torch.float32)',
        'ids = tokenizer("It is a truth universally acknowledged, that", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=32)[0]))",
        "```",
        "",
        "The modelling code (`modeling_mixerdistill.py` and the `mixerdistill_*.py` files beside it) needs "
        "only torch and transformers: the mixers run their PyTorch reference paths, and fused CUDA kernels "
        "when mamba-ssm, flash-linear-attention or causal-conv1d are installed and the model is on a GPU. "
        "`generate()` keeps one constant-size recurrent state per mixer layer.",
        "",
    ]
    stages = report.get("stages", [])
    if stages:
        lines += [
            "## Training",
            "",
            "| # | stage | tokens | steps | seconds | loss first | loss last |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {s['index']} | {s['name']} | {format_number(s.get('tokens'))} | {format_number(s.get('steps'))} "
            f"| {format_number(s.get('seconds'), 1)} | {format_number(s.get('loss_first'), 4)} "
            f"| {format_number(s.get('loss_last'), 4)} |"
            for s in stages
        ]
        lines += ["", f"{format_number(sum(s.get('tokens') or 0 for s in stages))} training tokens in all.", ""]
    lines += _perplexity_lines(report)
    lines += _lm_eval_lines(report, run_dir)
    recipe = (run_dir / "recipe.yaml") if run_dir else None
    if recipe is not None and recipe.is_file():
        lines += [
            "## Recipe",
            "",
            "`mixerdistill run` with this resolved recipe:",
            "",
            "```yaml",
            recipe.read_text().rstrip(),
            "```",
            "",
        ]
    lines += [
        "## Licence",
        "",
        f"Teacher licence: {licence.summary}." + (" Its text is in `LICENSE`." if licence.text else ""),
        "",
    ]
    return "\n".join(lines)
