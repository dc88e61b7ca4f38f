"""The one training loop every stage shares: AdamW, lr schedule, clipping, progress bar, metrics.

One backward per step, so the loop stays friendly to data parallelism.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from mixerdistill import interrupt
from mixerdistill.checkpoint import ResumePoint, StageProgress
from mixerdistill.console import stderr_console
from mixerdistill.distributed import SINGLE, SingleProcess, World, fault_point
from mixerdistill.errors import UserError, writing
from mixerdistill.stages import Stage


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    loss_first: float
    loss_last: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class NonFiniteLoss(UserError):
    """The loss or gradient became NaN/inf (usually: learning rate too high)."""


def build_optimizer(parameters: list[nn.Parameter], config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights, biases and per-head scalars are not decayed)."""
    decayed = [p for p in parameters if p.ndim >= 2]
    plain = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=tuple(config.betas),
                             eps=config.eps)


def train_only(model: nn.Module, parameters: list[nn.Parameter]) -> dict[nn.Parameter, bool]:
    """Make ``parameters`` the only ones of ``model`` that require gradients; returns the previous flags."""
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    return previous


def train_stage(stage: Stage, name: str, model: nn.Module, batches: Iterator[torch.Tensor],
                metrics_path: Path, device: torch.device, show_progress: bool = True,
                on_step: Callable[[int, int], dict | None] | None = None,
                progress: StageProgress | None = None, start: ResumePoint | None = None,
                progress_info: Callable[[], dict] | None = None,
                plan: SingleProcess | None = None, world: World = SINGLE) -> StageResult:
    """Run ``stage`` for its configured number of steps on ``batches`` and return its figures.

    Only the stage's trainable parameters require gradients while it runs; every step appends one
    JSON line to ``metrics_path``. ``on_step(step, tokens)`` runs after each optimizer step (e.g. a
    periodic evaluation); what it returns is added to that step's JSON line. Its time and the time
    spent writing checkpoints are not counted in the stage's seconds.

    Mid-stage checkpoints: when ``progress`` says one is due, the model, optimizer, scheduler, RNG
    states and the figures so far are saved (plus ``progress_info()``, the caller's own JSON state).
    ``start`` resumes from such a checkpoint: ``batches`` must then begin at batch ``start.step``.
    A stop signal (mixerdistill.interrupt) ends the loop after the step in progress: that step's
    checkpoint is written and interrupt.Interrupted raised (in the last step, the stage finishes).

    A non-finite loss or gradient norm raises NonFiniteLoss naming the stage, the step and the
    first module where a non-finite value appeared; with ``skip_nonfinite: N`` in the stage's
    config, up to N such steps are skipped (no optimizer step) before that happens.

    Several processes: ``plan`` (mixerdistill.distributed) says how the stage is spread over
    ``world``; ``batches`` yields the global batches on every rank, ``on_step`` runs on every rank,
    and only rank 0 shows progress and writes metrics and checkpoints.
    """
    plan = plan or SingleProcess()
    config = stage.config
    parameters = _unique(stage.trainable_parameters())
    if not parameters:
        raise ValueError(f"stage '{name}' has no trainable parameters")
    previous = train_only(model, parameters)
    saved = StageProgress.load(start, model) if start is not None else None
    running = plan.prepare(stage, model, parameters)
    parameters = running.parameters
    optimizer = build_optimizer(parameters, config.optimizer)
    total_steps = config.steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.schedule.factor(min(step, total_steps - 1), total_steps))
    tokens_per_step = config.batch_size * config.seq_len
    figures = {"loss_first": None, "loss_last": None, "skipped": 0, "seconds": 0.0}
    first_step = 0
    if saved is not None:
        plan.load_optimizer_state(optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        figures.update({k: start.info[k] for k in figures})
        first_step = start.step
        if world.main:
            truncate(metrics_path, start.info["metrics_bytes"])
    running.module.train()
    begin = time.perf_counter() - figures["seconds"]
    paused = 0.0
    bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console,
                   disable=not (show_progress and world.main), transient=False)
    try:
        metrics_file = None
        if world.main:
            with writing(metrics_path):
                metrics_file = open(metrics_path, "a")
        with bar, (metrics_file or contextlib.nullcontext()):
            task = bar.add_task(name, total=total_steps, completed=first_step, loss="-", speed="-")
            for step in range(first_step + 1, total_steps + 1):
                input_ids = plan.batch(next(batches)).to(device)
                local_loss, extra = plan.loss(input_ids)
                loss, extra = plan.reduce(local_loss, extra)
                tokens = step * tokens_per_step
                problem = None
                if not torch.isfinite(loss):
                    problem = f"loss is {loss.item()}; {locate_nonfinite_forward(running.module, running.stage, input_ids)}"
                else:
                    local_loss.backward()
                    # clip_grad_norm_ in two halves: the gradients must be inspected before clipping
                    # scales every one of them by a non-finite factor.
                    grad_norm = plan.grad_norm(parameters)
                    if not torch.isfinite(grad_norm):
                        problem = f"gradient norm is {grad_norm.item()}; {locate_nonfinite_gradient(running.module)}"
                    elif config.grad_clip is not None:
                        torch.nn.utils.clip_grads_with_norm_(parameters, config.grad_clip, grad_norm)
                if problem is not None:
                    optimizer.zero_grad(set_to_none=True)
                    message = f"stage '{name}', step {step} of {total_steps}: {problem}"
                    figures["skipped"] += 1
                    if figures["skipped"] > config.skip_nonfinite:
                        raise NonFiniteLoss(
                            f"{message}. Stopped after {figures['skipped']} non-finite step(s) "
                            f"(skip_nonfinite: {config.skip_nonfinite}); the last checkpoint is intact: "
                            f"lower the lr and continue with --resume")
                    if world.main:
                        stderr_console.print(f"[yellow]warning:[/] {message}; step skipped "
                                             f"({figures['skipped']} of at most {config.skip_nonfinite})",
                                             highlight=False)
                    record = {"stage": name, "step": step, "tokens": tokens, "skipped": problem}
                    scheduler.step()  # the schedule follows the data position
                else:
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    figures["loss_last"] = loss.item()
                    if figures["loss_first"] is None:
                        figures["loss_first"] = figures["loss_last"]
                    elapsed = time.perf_counter() - begin - paused
                    record = {"stage": name, "step": step, "tokens": tokens, "loss": figures["loss_last"],
                              "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                              "tokens_per_second": tokens / elapsed, "seconds": elapsed, **extra}
                pause_start = time.perf_counter()
                if on_step is not None:
                    record.update(on_step(step, tokens) or {})
                    running.module.train()
                if world.main:
                    with writing(metrics_path):
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                stopping = interrupt.stop_requested(step, world)  # issue 20: a signal ends the run after this step
                if progress is not None and step < total_steps and (world.agree(progress.due(step)) or stopping):
                    figures["seconds"] = pause_start - begin - paused
                    state = {"optimizer": plan.optimizer_state(optimizer), "scheduler": scheduler.state_dict(),
                             "rng": rng_state()}
                    plan.sync(model)
                    if world.main:
                        progress.save(step, model, state, {**figures, "metrics_bytes": metrics_file.tell(),
                                                           **(progress_info() if progress_info else {})})
                    world.barrier()
                fault_point(world)
                if stopping and step < total_steps:
                    raise interrupt.interrupted()  # its checkpoint is written (the last step: after the stage's)
                paused += time.perf_counter() - pause_start
                elapsed = time.perf_counter() - begin - paused
                bar.update(task, completed=step, speed=f"{tokens / elapsed:.0f}",
                           loss=f"{record['loss']:.4g}" if "loss" in record else "skipped")
        plan.finish(model)
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.eval()
    seconds = time.perf_counter() - begin - paused
    if figures["loss_first"] is None:
        raise NonFiniteLoss(f"stage '{name}': every step was skipped as non-finite")
    return StageResult(name, total_steps, total_steps * tokens_per_step, seconds, figures["loss_first"],
                       figures["loss_last"])


def rng_state() -> dict:
    """Every random generator a step may draw from: torch (CPU and CUDA), Python's, NumPy's if loaded.

    Only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, position, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        name, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, cached))


def seed_everything(seed: int) -> None:
    """Seed torch and Python (and NumPy if loaded), so a stage's randomness depends on its seed only."""
    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def locate_nonfinite_forward(model: nn.Module, stage: Stage, input_ids: torch.Tensor) -> str:
    """Re-run the stage's loss on the failing batch with forward hooks on every module of ``model``;
    name the first module (in execution order) whose output holds a NaN or inf.

    Runs only after a failure, so the normal path pays nothing.
    """
    found: list[str] = []

    def check(name: str):
        def hook(module, inputs, output):
            if not found and any(not torch.isfinite(t).all() for t in _tensors(output)):
                found.append(name)
        return hook

    handles = [module.register_forward_hook(check(name)) for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            stage.loss(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return f"first non-finite output in module '{found[0]}'"
    return "every module's output was finite: the loss itself (or the teacher) produced it"


def locate_nonfinite_gradient(model: nn.Module) -> str:
    """Name the module closest to the output whose parameters got a non-finite gradient (the backward
    pass runs from the last layer to the first, so that is where it first appeared)."""
    bad = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if not bad:
        return "no parameter gradient is non-finite"
    module = bad[-1].rsplit(".", 1)[0]
    return f"first non-finite gradient in module '{module}' (parameter '{bad[-1]}'; {len(bad)} parameter(s) affected)"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def truncate(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (drops metrics lines written after a checkpoint)."""
    if path.exists() and path.stat().st_size > size:
        with writing(path):
            os.truncate(path, size)


def _unique(parameters) -> list[nn.Parameter]:
    seen, unique = set(), []
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique
