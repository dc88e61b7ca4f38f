"""A run: teacher → student → stages → report, in one output directory.

Directory layout::

    recipe.yaml                  the resolved recipe (every default filled in)
    metrics.jsonl                one JSON line per training step
    tokenizer/                   the teacher's tokenizer
    stage_<n>_<name>/            checkpoint after stage n (model.safetensors, student.json, manifest.json)
    resume/stage_<n>_<name>/     the newest mid-stage checkpoint of the stage in progress (see checkpoint.py)
    report.json, report.md       figures of the run

A finished stage (its checkpoint is complete) is never redone when the run is resumed; the stage in
progress continues from its newest complete mid-stage checkpoint, and gives bitwise the same weights
as an uninterrupted run on the same machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from mixerdistill import distributed, interrupt
from mixerdistill.checkpoint import (PROGRESS_DIR, StageProgress, finished_stage, load_weights, save_checkpoint,
                                     write_text_atomic)
from mixerdistill.console import stderr_console
from mixerdistill.data import TokenData
from mixerdistill.errors import UserError, writing
from mixerdistill.evaluation import greedy_continuation, perplexity
from mixerdistill.lock import clear_directory, output_lock, run_files
from mixerdistill.plots import write_run_plots
from mixerdistill.plugins import get_dataset, get_mixer, get_stage
from mixerdistill.recipe import Recipe
from mixerdistill.report import write_report_markdown
from mixerdistill.stages import StageContext
from mixerdistill.student import StudentSpec, build_student, mixer_counts, mixer_layers
from mixerdistill.teacher import find_adapter
from mixerdistill.teacher_sources import load_teacher
from mixerdistill.training import seed_everything, train_stage, truncate

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
METRICS_FILE = "metrics.jsonl"


def stage_directory(output: Path, index: int, name: str) -> Path:
    return output / f"stage_{index}_{name}"


def check_output(output: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless asked to (writes nothing)."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if output.is_dir() and run_files(output) and not overwrite:
        if not resume:
            raise UserError(f"output directory {output} is not empty: pass --resume to continue that run "
                            f"or --overwrite to replace it")
        recorded = output / RECIPE_FILE
        if not recorded.is_file():
            raise UserError(f"cannot resume: {output} has no {RECIPE_FILE}")
        if yaml.safe_load(recorded.read_text()) != json.loads(json.dumps(recipe.resolved())):
            raise UserError(f"cannot resume: the recipe differs from the one recorded in {recorded}; "
                            f"use --overwrite to start again or choose another --output")


def prepare_output(output: Path, recipe: Recipe, overwrite: bool) -> None:
    """Create the run directory (emptied first with ``overwrite``) and record the resolved recipe."""
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            clear_directory(output)  # keeps the run's lock
    write_text_atomic(output / RECIPE_FILE, yaml.safe_dump(recipe.resolved(), sort_keys=False))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{requested}' requested but CUDA is not available")
    return torch.device(requested)


def execute(recipe: Recipe, output: Path, resume: bool = False, overwrite: bool = False,
            show_progress: bool = True) -> dict:
    """Run every stage of ``recipe`` into ``output`` and return the report.

    Under torchrun every rank calls this: the ranks train together (mixerdistill.distributed), all of
    them evaluate, and rank 0 alone logs and writes files (the others wait at a barrier). Rank 0 alone
    takes the samples and lm-eval scores at the end; the other ranks return the report without them.

    The output directory is locked for the whole run (mixerdistill.lock); SIGINT, SIGTERM and SIGUSR1
    end it after the step in progress with a checkpoint and raise interrupt.Interrupted.
    """
    world, device = distributed.start(recipe.distributed, pick_device(recipe.device))
    try:
        with output_lock(output, world), interrupt.stop_signals(world.main):  # issue 20
            return _execute(recipe, output, resume, overwrite, show_progress, world, device)
    finally:
        distributed.stop(world)


def _execute(recipe: Recipe, output: Path, resume: bool, overwrite: bool, show_progress: bool,
             world: distributed.World, device: torch.device) -> dict:
    log = stderr_console.print if world.main else _silent
    main = world.main
    # Everything that can reject the recipe runs before the first file is written.
    distributed.check_batch_sizes(recipe, world)
    check_output(output, recipe, resume, overwrite)
    world.barrier()  # every rank has looked at the output directory before rank 0 writes to it
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    previous = _load_json(output / REPORT_FILE) if resume else {}

    started = time.perf_counter()
    log(f"[bold]teacher[/]: loading ({recipe.teacher.source})")
    teacher, tokenizer = load_teacher(recipe.teacher)
    teacher.to(device)
    adapter = find_adapter(teacher.config, recipe.teacher.adapter)

    log("[bold]data[/]: tokenising")
    source_cls = get_dataset(recipe.data.source)
    data = TokenData(source_cls(recipe.data.config), tokenizer)
    data.check_batches(recipe.stages)  # issue 20: every stage gets full batches, known before training
    eval_windows = data.heldout_windows(recipe.eval.seq_len, recipe.eval.tokens) if recipe.eval.tokens else None

    mixer_name = recipe.student.mixer.name
    torch.manual_seed(recipe.seed)
    student = build_student(teacher, adapter, get_mixer(mixer_name), recipe.student.mixer.config,
                            recipe.student.keep_attention, transfer=recipe.student.init == "transfer")
    spec = StudentSpec(mixer=mixer_name, mixer_config=recipe.student.mixer.config.model_dump(mode="json"),
                       keep_attention=sorted(recipe.student.keep_attention), adapter=adapter.name,
                       teacher=recipe.teacher.model_dump(mode="json"),
                       teacher_config=teacher.config.to_dict())
    counts = mixer_counts(student, adapter, mixer_name)
    if main:
        prepare_output(output, recipe, overwrite)
        with writing(output / "tokenizer"):
            tokenizer.save_pretrained(output / "tokenizer")
    log(f"[bold]student[/]: {', '.join(f'{n} × {k}' for k, n in counts.items())}")

    def measure(model) -> float | None:
        if eval_windows is None:
            return None
        return perplexity(model, eval_windows, recipe.eval.batch_size, device)

    report = {
        "recipe": recipe.name,
        "teacher": {"source": recipe.teacher.source, "adapter": adapter.name,
                    "parameters": sum(p.numel() for p in teacher.parameters()),
                    "perplexity": previous.get("teacher", {}).get("perplexity")},
        "student": {"mixers": counts, "parameters": sum(p.numel() for p in student.parameters()),
                    "perplexity_after_transfer": previous.get("student", {}).get("perplexity_after_transfer"),
                    "perplexity": None},
        "data": {"train_tokens": len(data.train) if data.train is not None else None,
                 "heldout_tokens": len(data.heldout),
                 "eval_tokens": int(eval_windows.numel()) if eval_windows is not None else 0},
        "stages": [],
    }
    if report["teacher"]["perplexity"] is None and eval_windows is not None:
        log("[bold]eval[/]: teacher perplexity")
        report["teacher"]["perplexity"] = measure(teacher)
    if recipe.eval.after_each_stage and report["student"]["perplexity_after_transfer"] is None:
        log("[bold]eval[/]: student perplexity after transfer")
        report["student"]["perplexity_after_transfer"] = measure(student)
    if main:
        _write_report(output, report)

    report["curve"] = []  # a finished stage's points come from its checkpoint's manifest
    if recipe.eval.every_tokens and report["student"]["perplexity_after_transfer"]:
        report["curve"].append({"stage_index": 0, "tokens": 0,
                                "perplexity": report["student"]["perplexity_after_transfer"]})

    def curve_point(index: int, config, plan: distributed.SingleProcess):
        """An on_step callback adding held-out perplexity every ``eval.every_tokens`` training tokens
        (on every rank: the model may be sharded or spread over ranks)."""
        every = recipe.eval.every_tokens
        if not every or eval_windows is None:
            return None
        earlier = sum(s.config.tokens_rounded() for s in recipe.stages[:index - 1])
        step_tokens = config.batch_size * config.seq_len

        def on_step(step: int, tokens: int) -> dict | None:
            if (earlier + tokens) // every == (earlier + tokens - step_tokens) // every:
                return None
            value = measure(plan.evaluation_model(student))
            report["curve"].append({"stage_index": index, "tokens": earlier + tokens, "perplexity": value})
            return {"perplexity": value}
        return on_step

    def stage_curve(index: int) -> list[dict]:
        return [p for p in report["curve"] if p["stage_index"] == index]

    trained = False  # whether this invocation trained anything (else earlier lm-eval scores still hold)
    context = StageContext(teacher=teacher, student=student, adapter=adapter,
                           mixers=mixer_layers(student, adapter))
    metrics_path = output / METRICS_FILE
    metrics_bytes = 0  # where the metrics of the next stage begin
    resuming = resume  # true until the first stage that is not finished
    for index, block in enumerate(recipe.stages, start=1):
        directory = stage_directory(output, index, block.name)
        manifest = finished_stage(directory, index) if resuming else None  # a damaged one is an error
        if manifest is not None and "stage" in manifest:
            log(f"[bold]stage {index}[/] {block.name}: finished earlier, loading {directory.name}")
            load_weights(student, directory)
            student.to(device)
            report["stages"].append(manifest["stage"])
            report["curve"] += manifest["curve"]
            metrics_bytes = manifest["metrics_bytes"]
            continue
        trained = True
        config = block.config
        progress = StageProgress(output / PROGRESS_DIR / directory.name, recipe.output.checkpoint.every_steps,
                                 recipe.output.checkpoint.every_minutes)
        point = progress.latest() if resuming else None
        resuming = False
        world.barrier()  # every rank has read the progress checkpoint before rank 0 may clear the folder
        if point is None and main:
            progress.clear()
            truncate(metrics_path, metrics_bytes)
        if point is not None:
            log(f"[bold]stage {index}[/] {block.name}: resuming after step {point.step} ({point.directory.name})")
            report["curve"] += point.info["curve"]
        stage = get_stage(block.name)(config, context)
        seed = config.seed if config.seed is not None else recipe.seed + index
        seed_everything(seed)
        batches = data.train_batches(config.batch_size, config.seq_len, seed,
                                     start_batch=point.step if point else 0)
        plan = distributed.plan_for(recipe, block, world, device)
        interrupt.begin_stage(index, point.step if point else 0)  # issue 20: a signal now ends the step
        log(f"[bold]stage {index}[/] {block.name}: {config.steps()} steps × "
            f"{config.batch_size} × {config.seq_len} tokens" + (f", {plan.describe()}" if world.active else ""))
        result = train_stage(stage, block.name, student, batches, metrics_path, device,
                             show_progress=show_progress, on_step=curve_point(index, config, plan),
                             progress=progress, start=point,
                             progress_info=lambda index=index: {"curve": stage_curve(index)},
                             plan=plan, world=world)
        entry = {"index": index, "name": block.name, "steps": result.steps, "tokens": result.tokens,
                 "seconds": round(result.seconds, 3), "tokens_per_second": round(result.tokens_per_second, 2),
                 "loss_first": result.loss_first, "loss_last": result.loss_last,
                 "perplexity_after": measure(student) if recipe.eval.after_each_stage else None}
        report["stages"].append(entry)
        if main:
            metrics_bytes = metrics_path.stat().st_size
            if recipe.output.save_every_stage:
                save_checkpoint(student, spec, directory,
                                extra={"stage": entry, "metrics_bytes": metrics_bytes, "curve": stage_curve(index)})
            progress.clear()
            _write_report(output, report)
        world.barrier()
        log(f"[bold]stage {index}[/] {block.name}: loss {result.loss_first:.4g} → {result.loss_last:.4g}, "
            f"{result.tokens_per_second:.0f} tok/s"
            + (f", perplexity {entry['perplexity_after']:.2f}" if entry["perplexity_after"] else ""))
        interrupt.end_stage(world)  # issue 20: a stop asked for in the stage's last step stops here

    last = report["stages"][-1]["perplexity_after"] if report["stages"] else None
    report["student"]["perplexity"] = last if last is not None else measure(student)
    if not main:
        return report  # samples, lm-eval scores and the report's last write are rank 0's
    if not report["stages"]:
        save_checkpoint(student, spec, stage_directory(output, 0, "transfer"))
    if recipe.eval.prompt:
        report["samples"] = {
            "prompt": recipe.eval.prompt,
            "teacher": greedy_continuation(teacher, tokenizer, recipe.eval.prompt, recipe.eval.max_new_tokens, device),
            "student": greedy_continuation(student, tokenizer, recipe.eval.prompt, recipe.eval.max_new_tokens, device),
        }
    benchmarks = recipe.eval.lm_eval
    if benchmarks.tasks:
        if previous.get("eval") and not trained:
            report["eval"] = previous["eval"]
        else:
            from mixerdistill.harness import EvalSettings, evaluate_pair, lm_eval_limit

            settings = EvalSettings(tasks=benchmarks.tasks, limit=lm_eval_limit(benchmarks.limit),
                                    batch_size=benchmarks.batch_size, num_fewshot=benchmarks.num_fewshot)
            report["eval"] = evaluate_pair(student, teacher if benchmarks.with_teacher else None, tokenizer, settings)
    report["plots"] = write_run_plots(output)
    report["seconds"] = round(time.perf_counter() - started, 2)
    _write_report(output, report)
    return report


def _silent(*args, **kwargs) -> None:
    """Logging on ranks other than 0."""


def _write_report(output: Path, report: dict) -> None:
    write_text_atomic(output / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    write_report_markdown(output / "report.md", report)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
