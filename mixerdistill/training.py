"""The one training loop every stage shares: optimizer (mixerdistill.optimizers), lr schedule, clipping,
progress bar, metrics.

One backward per step, so the loop stays friendly to data parallelism.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from mixerdistill import faults, interrupt
from mixerdistill.checkpoint import ResumePoint, StageProgress
from mixerdistill.console import stderr_console
from mixerdistill.distributed.plans import Plan, SingleProcess
from mixerdistill.distributed.world import SINGLE, World
from mixerdistill.errors import UserError, writing
from mixerdistill.memory import release_freed_memory
from mixerdistill.optimizers import build_optimizer
from mixerdistill.stages import Stage
from mixerdistill.student import own_storage


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


def train_only(model: nn.Module, parameters: list[nn.Parameter]) -> dict[nn.Parameter, bool]:
    """Make ``parameters`` the only ones of ``model`` that require gradients; returns the previous flags."""
    previous = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    names = {p: name for name, p in model.named_parameters()}
    for p in parameters:
        if not p.is_floating_point():
            raise UserError(
                f"{names.get(p, 'a parameter')} is stored as {p.dtype} codes and cannot be trained "
                "(teacher.embedding_storage: q8_0 needs the stage to freeze embeddings)"
            )
        p.requires_grad_(True)
    return previous


@dataclass
class Placement:
    """Where a stage trains: the device, the ranks and the plan that spreads the stage over them."""

    device: torch.device
    plan: Plan = field(default_factory=SingleProcess)
    world: World = SINGLE


@dataclass
class Reporting:
    """What the loop writes besides the weights: one metrics line per step, the progress bar, and the
    caller's ``on_step(step, tokens)`` hook (e.g. a periodic evaluation; what it returns joins the
    step's metrics line)."""

    metrics_path: Path
    show_progress: bool = True
    on_step: Callable[[int, int], dict | None] | None = None


@dataclass
class Checkpointing:
    """Mid-stage checkpoints: ``progress`` says when one is due and writes it (with ``info()``, the
    caller's own JSON state); ``start`` is the checkpoint to resume from."""

    progress: StageProgress | None = None
    start: ResumePoint | None = None
    info: Callable[[], dict] | None = None


def train_stage(
    stage: Stage,
    name: str,
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    placement: Placement,
    reporting: Reporting,
    checkpointing: Checkpointing | None = None,
) -> StageResult:
    """Run ``stage`` for its configured number of steps on ``batches`` and return its figures.

    Only the stage's trainable parameters require gradients while it runs; every step appends one
    JSON line to ``reporting.metrics_path``. The time of ``on_step`` and of writing checkpoints is not
    counted in the stage's seconds. When resuming (``checkpointing.start``), ``batches`` must begin at
    batch ``start.step``. A stop signal (mixerdistill.interrupt) ends the loop after the step in progress:
    that step's checkpoint is written and interrupt.Interrupted raised (in the last step, the stage finishes).

    A non-finite loss or gradient norm raises NonFiniteLoss naming the stage, the step and the
    first module where a non-finite value appeared; with ``skip_nonfinite: N`` in the stage's
    config, up to N such steps are skipped (no optimizer step) before that happens.

    Several processes: ``placement.plan`` says how the stage is spread over ``placement.world``;
    ``batches`` yields the global batches on every rank, ``on_step`` runs on every rank, and only
    rank 0 shows progress and writes metrics and checkpoints.
    """
    parameters = _unique(stage.trainable_parameters())
    if not parameters:
        raise ValueError(f"stage '{name}' has no trainable parameters")
    own_storage(parameters, stage.context.teacher)  # what learns stops sharing the teacher's tensors
    previous = train_only(model, parameters)
    try:
        loop = StageLoop(stage, name, model, parameters, placement, reporting, checkpointing or Checkpointing())
        return loop.run(batches)
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.eval()


class StageLoop:
    """One stage's optimizer, schedule and running figures, and the steps that update them."""

    def __init__(
        self,
        stage: Stage,
        name: str,
        model: nn.Module,
        parameters: list[nn.Parameter],
        placement: Placement,
        reporting: Reporting,
        checkpointing: Checkpointing,
    ):
        self.name, self.model, self.config = name, model, stage.config
        self.placement, self.reporting, self.checkpointing = placement, reporting, checkpointing
        self.plan, self.world = placement.plan, placement.world
        saved = StageProgress.load(checkpointing.start, model) if checkpointing.start is not None else None
        self.running = self.plan.prepare(stage, model, parameters)
        self.parameters = self.running.parameters
        self.optimizer = build_optimizer(self.parameters, self.config.optimizer)
        self.total_steps = self.config.steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: self.config.schedule.factor(min(step, self.total_steps - 1), self.total_steps)
        )
        self.tokens_per_step = self.config.batch_size * self.config.seq_len
        self.figures = {"loss_first": None, "loss_last": None, "skipped": 0, "seconds": 0.0}
        self.first_step = 0
        if saved is not None:
            self._restore(saved)
        self.begin = time.perf_counter() - self.figures["seconds"]
        self.paused = 0.0  # seconds spent outside training (on_step, checkpoints)
        self.metrics_file = None

    def _restore(self, saved: dict) -> None:
        """Continue from a mid-stage checkpoint: optimizer, schedule, RNG and figures; metrics written
        after it are dropped."""
        start = self.checkpointing.start
        self.plan.load_optimizer_state(self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        self.figures.update({k: start.info[k] for k in self.figures})
        self.first_step = start.step
        if self.world.main:
            truncate(self.reporting.metrics_path, start.info["metrics_bytes"])

    def run(self, batches: Iterator[torch.Tensor]) -> StageResult:
        self.running.module.train()
        bar = Progress(
            TextColumn(f"[bold]{self.name}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console,
            disable=not (self.reporting.show_progress and self.world.main),
            transient=False,
        )
        if self.world.main:
            with writing(self.reporting.metrics_path):
                self.metrics_file = open(self.reporting.metrics_path, "a")
        with bar, self.metrics_file or contextlib.nullcontext():
            task = bar.add_task(self.name, total=self.total_steps, completed=self.first_step, loss="-", speed="-")
            for step in range(self.first_step + 1, self.total_steps + 1):
                record = self.step(step, next(batches))
                pause_start = time.perf_counter()
                self.after_step(step, record, pause_start)
                self.paused += time.perf_counter() - pause_start
                tokens = step * self.tokens_per_step
                bar.update(
                    task,
                    completed=step,
                    speed=f"{tokens / self.elapsed():.0f}",
                    loss=f"{record['loss']:.4g}" if "loss" in record else "skipped",
                )
        self.plan.finish(self.model)
        if self.figures["loss_first"] is None:
            raise NonFiniteLoss(f"stage '{self.name}': every step was skipped as non-finite")
        return StageResult(
            self.name,
            self.total_steps,
            self.total_steps * self.tokens_per_step,
            self.elapsed(),
            self.figures["loss_first"],
            self.figures["loss_last"],
        )

    def elapsed(self) -> float:
        """Training seconds so far (pauses excluded)."""
        return time.perf_counter() - self.begin - self.paused

    def step(self, step: int, batch: torch.Tensor) -> dict:
        """One optimizer step (or a skipped one) on a global (B, T) batch; returns its metrics line.

        The loss, the metrics and the gradient norm stay on the device until one copy to the host
        (``tolist``): the step's only host sync, however many layers report a distance.
        """
        input_ids = self.plan.batch(batch).to(self.placement.device)
        local_loss, extra = self.plan.loss(input_ids)
        loss, extra = self.plan.reduce(local_loss, extra)
        local_loss.backward()
        grad_norm = self.plan.grad_norm(self.parameters)
        host = torch.stack(
            [
                loss.detach().double().reshape(()),
                grad_norm.detach().double().reshape(()),
                *(torch.as_tensor(v, dtype=torch.float64, device=loss.device).reshape(()) for v in extra.values()),
            ]
        ).tolist()  # host sync
        loss_value, norm_value, extra = host[0], host[1], dict(zip(extra, host[2:]))
        tokens = step * self.tokens_per_step
        if not math.isfinite(loss_value):
            problem = (
                f"loss is {loss_value}; {locate_nonfinite_forward(self.running.module, self.running.stage, input_ids)}"
            )
        elif not math.isfinite(norm_value):
            problem = f"gradient norm is {norm_value}; {locate_nonfinite_gradient(self.running.module)}"
        else:
            # clip_grad_norm_ in two halves: the norm is checked before clipping could scale every gradient
            # by a non-finite factor.
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(self.parameters, self.config.grad_clip, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            release_freed_memory()  # the step's freed activations and gradients go back to the system
            self.figures["loss_last"] = loss_value
            if self.figures["loss_first"] is None:
                self.figures["loss_first"] = loss_value
            elapsed = self.elapsed()
            return {
                "stage": self.name,
                "step": step,
                "tokens": tokens,
                "loss": loss_value,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": norm_value,
                "tokens_per_second": tokens / elapsed,
                "seconds": elapsed,
                **extra,
            }
        return self.skip(step, tokens, problem)

    def skip(self, step: int, tokens: int, problem: str) -> dict:
        """A non-finite step: no optimizer step, or NonFiniteLoss once ``skip_nonfinite`` is used up."""
        self.optimizer.zero_grad(set_to_none=True)
        config = self.config
        message = f"stage '{self.name}', step {step} of {self.total_steps}: {problem}"
        self.figures["skipped"] += 1
        if self.figures["skipped"] > config.skip_nonfinite:
            raise NonFiniteLoss(
                f"{message}. Stopped after {self.figures['skipped']} non-finite step(s) "
                f"(skip_nonfinite: {config.skip_nonfinite}); the last checkpoint is intact: "
                f"lower the lr and continue with --resume"
            )
        if self.world.main:
            stderr_console.print(
                f"[yellow]warning:[/] {message}; step skipped "
                f"({self.figures['skipped']} of at most {config.skip_nonfinite})",
                highlight=False,
            )
        self.scheduler.step()  # the schedule follows the data position
        return {"stage": self.name, "step": step, "tokens": tokens, "skipped": problem}

    def after_step(self, step: int, record: dict, pause_start: float) -> None:
        """The caller's hook, the metrics line, a mid-stage checkpoint when one is due, the fault hook."""
        if self.reporting.on_step is not None:
            record.update(self.reporting.on_step(step, step * self.tokens_per_step) or {})
            self.running.module.train()
        if self.world.main:
            with writing(self.reporting.metrics_path):
                self.metrics_file.write(json.dumps(record) + "\n")
                self.metrics_file.flush()
        progress = self.checkpointing.progress
        stopping = interrupt.stop_requested(step, self.world)  # issue 20: a signal ends the run after this step
        if progress is not None and step < self.total_steps and (self.world.agree(progress.due(step)) or stopping):
            self.figures["seconds"] = pause_start - self.begin - self.paused
            state = {
                "optimizer": self.plan.optimizer_state(self.optimizer),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
            }
            self.plan.sync(self.model)
            if self.world.main:
                info = self.checkpointing.info() if self.checkpointing.info else {}
                progress.save(
                    step, self.model, state, {**self.figures, "metrics_bytes": self.metrics_file.tell(), **info}
                )
            self.world.barrier()
        faults.step_done(self.world.rank)
        if stopping and step < self.total_steps:
            raise interrupt.interrupted()  # its checkpoint is written (the last step: after the stage's)


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
