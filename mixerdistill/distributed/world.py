"""This process's place among the ranks of a run, and joining / leaving torchrun's process group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mixerdistill.errors import UserError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    collective_device: str = "cpu"  # where tensors for collectives live: cuda under nccl

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (decisions that depend on the clock, e.g. a checkpoint due)."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], device=self.collective_device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def largest(self, value: int) -> int:
        """The largest of every rank's ``value`` (e.g. a signal any one rank received)."""
        if not self.active:
            return value
        flag = torch.tensor([value], device=self.collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor every rank holds (same shape); float64 for exact sums."""
        if not self.active:
            return values
        total = values.detach().to(self.collective_device, torch.float64).clone()
        dist.all_reduce(total)
        return (total / self.size).to(values.device, values.dtype)


SINGLE = World()
_current = SINGLE  # the world ``start`` joined in this process


def current_world() -> World:
    """The world this process joined (``SINGLE`` before ``start`` and without torchrun)."""
    return _current


def under_torchrun() -> bool:
    """Whether this process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(spec, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (nothing without torchrun); returns the world and the
    device this rank computes on (``cuda:LOCAL_RANK`` when the recipe's device is CUDA)."""
    if not under_torchrun():
        return SINGLE, device
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with "
            f"torchrun (or `mixerdistill run --nproc N`)"
        )
    rank, size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise UserError(
                f"device: '{device}' would put every rank on one GPU; use device: cuda or auto "
                f"under torchrun (rank r uses cuda:LOCAL_RANK)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = choose_backend(spec.backend, device)
    dist.init_process_group(backend, timeout=timedelta(minutes=spec.timeout_minutes))
    global _current
    _current = World(rank, size, local_rank, "cuda" if backend == "nccl" else "cpu")
    return _current, device


def choose_backend(requested: str, device: torch.device) -> str:
    """``auto``: nccl when this rank computes on CUDA, else gloo."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UserError(
            f"distributed.backend: nccl needs CUDA devices, but this run computes on '{device}'; "
            f"use backend: gloo or auto"
        )
    return requested


def stop(world: World) -> None:
    """Leave the process group (local: the other ranks may have exited already)."""
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
