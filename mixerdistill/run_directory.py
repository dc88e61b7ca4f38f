"""The run directory: what a run writes where, and the rules for touching an existing one.

Layout::

    recipe.yaml                  the resolved recipe (every default filled in, every automatic choice made)
    metrics.jsonl                one JSON line per training step
    tokenizer/                   the teacher's tokenizer
    stage_<n>_<name>/            checkpoint after stage n (model.safetensors, student.json, manifest.json)
    resume/stage_<n>_<name>/     the newest mid-stage checkpoint of the stage in progress (see checkpoint.py)
    report.json, report.md       figures of the run (mixerdistill.run_report)
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mixerdistill.checkpoint import write_text_atomic
from mixerdistill.errors import UserError, writing
from mixerdistill.lock import clear_directory, run_files

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"


def stage_directory(output: Path, index: int, name: str) -> Path:
    return output / f"stage_{index}_{name}"


def check_output(output: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless asked to (writes nothing)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if output.is_dir() and run_files(output) and not overwrite:
        if not resume:
            raise UserError(
                f"output directory {output} is not empty: pass --resume to continue that run "
                f"or --overwrite to replace it"
            )
        if not (output / RECIPE_FILE).is_file():
            raise UserError(f"cannot resume: {output} has no {RECIPE_FILE}")


def check_same_recipe(output: Path, resolved: dict) -> None:
    """A resumed run must have the recipe it started with (``resolved``: ``Recipe.resolved()``)."""
    recorded = output / RECIPE_FILE
    if yaml.safe_load(recorded.read_text()) != json.loads(json.dumps(resolved)):
        raise UserError(
            f"cannot resume: the recipe differs from the one recorded in {recorded}; "
            f"use --overwrite to start again or choose another --output"
        )


def prepare_output(output: Path, resolved: dict, overwrite: bool) -> None:
    """Create the run directory (emptied first with ``overwrite``) and record the resolved recipe."""
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_directory(output)  # keeps the run's lock
    write_text_atomic(output / RECIPE_FILE, yaml.safe_dump(resolved, sort_keys=False))
