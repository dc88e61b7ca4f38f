"""The one training loop every stage shares: AdamW, lr schedule, clipping, progress bar, metrics.

One backward per step, so the loop stays friendly to data parallelism.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from mixerdistill.console import stderr_console
from mixerdistill.errors import UserError
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
                on_step: Callable[[int, int], dict | None] | None = None) -> StageResult:
    """Run ``stage`` for its configured number of steps on ``batches`` and return its figures.

    Only the stage's trainable parameters require gradients while it runs; every step appends one
    JSON line to ``metrics_path``. ``on_step(step, tokens)`` runs after each optimizer step (e.g. a
    periodic evaluation); what it returns is added to that step's JSON line. Its time is not counted
    in the stage's seconds.
    """
    config = stage.config
    parameters = _unique(stage.trainable_parameters())
    if not parameters:
        raise ValueError(f"stage '{name}' has no trainable parameters")
    previous = train_only(model, parameters)
    optimizer = build_optimizer(parameters, config.optimizer)
    total_steps = config.steps()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.schedule.factor(min(step, total_steps - 1), total_steps))
    tokens_per_step = config.batch_size * config.seq_len
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    paused = 0.0
    progress = Progress(TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=stderr_console,
                        disable=not show_progress, transient=False)
    try:
        with progress, open(metrics_path, "a") as metrics_file:
            task = progress.add_task(name, total=total_steps, loss="-", speed="-")
            for step in range(total_steps):
                input_ids = next(batches).to(device)
                loss, extra = stage.loss(input_ids)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"stage '{name}', step {step}: loss is {loss.item()} (try a lower lr)")
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    parameters, config.grad_clip if config.grad_clip is not None else math.inf)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLoss(f"stage '{name}', step {step}: gradient norm is {grad_norm.item()}")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                elapsed = time.perf_counter() - start - paused
                tokens = (step + 1) * tokens_per_step
                record = {"stage": name, "step": step + 1, "tokens": tokens, "loss": losses[-1],
                          "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                          "tokens_per_second": tokens / elapsed, "seconds": elapsed, **extra}
                if on_step is not None:
                    pause_start = time.perf_counter()
                    record.update(on_step(step + 1, tokens) or {})
                    model.train()
                    paused += time.perf_counter() - pause_start
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                progress.update(task, advance=1, loss=f"{losses[-1]:.4g}", speed=f"{tokens / elapsed:.0f}")
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        model.eval()
    seconds = time.perf_counter() - start - paused
    return StageResult(name, total_steps, total_steps * tokens_per_step, seconds, losses[0], losses[-1])


def _unique(parameters) -> list[nn.Parameter]:
    seen, unique = set(), []
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique
