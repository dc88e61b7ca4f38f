"""lm-eval integration: the ``mixerdistill`` model type, loading students and teachers from runs, and
side-by-side scores of a student and its teacher.

Importing this module registers the model type with lm-eval, so
``--model mixerdistill --model_args pretrained=RUN_DIR`` (or a stage checkpoint folder; add
``teacher=true`` for the run's teacher) works in any lm-eval entry point started in this process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from mixerdistill.checkpoint import SPEC_FILE, CheckpointDamaged, checkpoint_problem, load_student
from mixerdistill.console import stderr_console
from mixerdistill.errors import UserError

MODEL_TYPE = "mixerdistill"
OFFLINE_TASK_PREFIX = "austen_"
STDERR_SUFFIX = "_stderr"


# -- finding and loading what a run holds ------------------------------------------------------
def find_checkpoint(path: str | Path, stage: int | None = None) -> Path:
    """The checkpoint folder for a run directory (its last complete stage, or stage ``stage``) or a
    checkpoint folder itself."""
    from mixerdistill.run_directory import RECIPE_FILE

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory or checkpoint folder")
    if (path / SPEC_FILE).is_file():
        if stage is not None:
            raise UserError(f"{path} is a checkpoint folder; choose a stage only in a run directory")
        return path
    if not (path / RECIPE_FILE).is_file():
        raise UserError(
            f"{path} is neither a run directory (no {RECIPE_FILE}) nor a checkpoint folder (no {SPEC_FILE})"
        )
    stages = sorted(
        (int(d.name.split("_")[1]), d) for d in path.glob("stage_*_*") if d.name.split("_")[1].isdigit() and d.is_dir()
    )
    if not stages:
        raise UserError(f"{path} holds no finished stage checkpoint yet")
    if stage is None:
        stage = stages[-1][0]
    chosen = [directory for number, directory in stages if number == stage]
    if not chosen:
        raise UserError(f"{path} has no finished stage {stage} (finished: {', '.join(str(n) for n, _ in stages)})")
    # A stage folder only appears once complete (checkpoint.write_checkpoint): one that fails its
    # manifest now was damaged afterwards, and no earlier stage is silently used instead.
    problem = checkpoint_problem(chosen[0])
    if problem is not None:
        earlier = [n for n, d in stages if n < stage and checkpoint_problem(d) is None]
        hint = f"; choose stage {earlier[-1]} explicitly (--stage {earlier[-1]} or its folder)" if earlier else ""
        raise CheckpointDamaged(f"stage {stage} checkpoint is damaged: {problem} ({chosen[0]}){hint}")
    return chosen[0]


def load_tokenizer(checkpoint: Path):
    """The run's tokenizer, saved in ``tokenizer/`` of the run directory, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    from mixerdistill.data import BYTE_TOKENIZER_FILE, ByteTokenizer
    from mixerdistill.teacher_sources import compact_tokenizer

    for folder in (checkpoint / "tokenizer", checkpoint.parent / "tokenizer"):
        if (folder / BYTE_TOKENIZER_FILE).is_file():
            return ByteTokenizer().to_transformers()
        if folder.is_dir():
            return compact_tokenizer(AutoTokenizer.from_pretrained(folder))
    raise UserError(f"no tokenizer/ folder beside {checkpoint}: evaluate a checkpoint inside its run directory")


def load_teacher_of(checkpoint: Path) -> nn.Module:
    """The teacher a checkpoint's student was distilled from, as its recipe named it."""
    from pydantic import TypeAdapter

    from mixerdistill.recipe import TeacherSpec
    from mixerdistill.student import StudentSpec
    from mixerdistill.teacher_sources import load_teacher

    spec = StudentSpec.from_file(checkpoint / SPEC_FILE)
    teacher, _ = load_teacher(TypeAdapter(TeacherSpec).validate_python(spec.teacher))
    return teacher


def as_transformers_tokenizer(tokenizer):
    """lm-eval needs a transformers tokenizer; the byte tokenizer of tiny teachers is converted."""
    from mixerdistill.data import ByteTokenizer

    return tokenizer.to_transformers() if isinstance(tokenizer, ByteTokenizer) else tokenizer


@register_model(MODEL_TYPE)
class MixerdistillLM(HFLM):
    """lm-eval's Hugging Face wrapper around a mixerdistill student (or its teacher).

    ``pretrained`` is a run directory or stage checkpoint folder, or a model already in memory (then
    ``tokenizer`` must be given). ``teacher=True`` evaluates the run's teacher instead of the student.
    Other keyword arguments (batch_size, max_length, ...) are HFLM's.
    """

    def __init__(self, pretrained, teacher: bool = False, tokenizer=None, device: str | None = None, **kwargs):
        from mixerdistill.device import pick_device

        if isinstance(pretrained, (str, Path)):
            checkpoint = find_checkpoint(pretrained)
            tokenizer = load_tokenizer(checkpoint)
            pretrained = load_teacher_of(checkpoint) if teacher else load_student(checkpoint)[0]
            # lm-eval's command line asks for "cuda:0" unless told otherwise; like its own HF model, fall
            # back to the CPU where CUDA is absent.
            if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
                device = "auto"
            pretrained.to(pick_device(device))
        elif tokenizer is None:
            raise ValueError("a model given in memory needs its tokenizer")
        kwargs.pop("dtype", None)  # the weights keep the precision of the run
        super().__init__(pretrained=pretrained.eval(), tokenizer=as_transformers_tokenizer(tokenizer), **kwargs)


# -- evaluating --------------------------------------------------------------------------------
def lm_eval_limit(limit: float | None) -> float | int | None:
    """lm-eval reads a limit below 1 as a fraction of each task and anything else as a count."""
    if limit is None:
        return None
    return int(limit) if limit >= 1 else limit


@dataclass
class EvalSettings:
    """What ``mixerdistill eval`` and a recipe's ``eval.lm_eval`` block ask of lm-eval."""

    tasks: list[str]
    limit: float | None = None
    batch_size: int = 1
    num_fewshot: int | None = None


def task_manager(tasks: list[str]):
    """An lm-eval TaskManager that also knows the offline tasks (generated when a task needs them).

    lm-eval's own task catalogue is indexed only when a task outside the offline ones is asked for.
    """
    from lm_eval.tasks import TaskManager

    from mixerdistill.lm_tasks import austen_task_dir

    offline = [t.startswith(OFFLINE_TASK_PREFIX) for t in tasks]
    include = [str(austen_task_dir())] if any(offline) else None
    return TaskManager(include_path=include, include_defaults=not all(offline))


def score(lm: HFLM, settings: EvalSettings, manager=None) -> dict:
    """Run lm-eval on one model: {"scores": {task: {metric: value}}, "stderr": ..., "samples", "seconds"}."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(settings.tasks)
    unknown = [t for t in settings.tasks if not manager.match_tasks([t])]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (list them with `mixerdistill lm-eval -- ls tasks`)"
        )
    started = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=list(settings.tasks),
        limit=settings.limit,
        num_fewshot=settings.num_fewshot,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
    )
    seconds = time.perf_counter() - started
    scores, errors = {}, {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, selector = key.split(",", 1)  # e.g. "acc_stderr", "none"
            target = errors if metric.endswith(STDERR_SUFFIX) else scores
            name = metric.removesuffix(STDERR_SUFFIX) + ("" if selector == "none" else f",{selector}")
            target.setdefault(task, {})[name] = float(value)
    samples = {task: counts.get("effective") for task, counts in results.get("n-samples", {}).items()}
    return {"scores": scores, "stderr": errors, "samples": samples, "seconds": round(seconds, 2)}


def evaluate_pair(student: nn.Module, teacher: nn.Module | None, tokenizer, settings: EvalSettings) -> dict:
    """Score the student and, when given, the teacher with identical settings.

    Returns what ``eval.json`` and ``report.json["eval"]`` hold: the settings, ``student`` and
    ``teacher`` results (see ``score``; teacher None when not asked for).
    """
    # lm-eval logs a warning per truncated request and per defaulted metric option: keep its errors only.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(settings.tasks)
    tokenizer = as_transformers_tokenizer(tokenizer)
    entry = {
        "tasks": list(settings.tasks),
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "num_fewshot": settings.num_fewshot,
        "teacher": None,
    }
    for who, model in (("teacher", teacher), ("student", student)):
        if model is None:
            continue
        stderr_console.print(f"[bold]lm-eval[/]: {who} on {', '.join(settings.tasks)}")
        lm = MixerdistillLM(model, tokenizer=tokenizer, batch_size=settings.batch_size)
        entry[who] = score(lm, settings, manager)
    return entry
