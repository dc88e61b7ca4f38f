"""How one stage is spread over the ranks: the ``Plan`` protocol and its four implementations.

- ``SingleProcess``: one process; every method is the identity.
- ``DataParallel``: every rank holds the whole student and trains on its slice of each global batch;
  ``DistributedDataParallel`` averages the gradients during the backward pass.
- ``LayerParallel`` (``distributed.layer_parallel``, layer-local stages 1–2 only): every rank sees the
  whole global batch but owns a contiguous block of replaced layers (``Stage.restrict``); the stage's loss
  is summed over ranks, the gradient norm (for clipping) is the global one, and the layers are broadcast
  from their owners whenever the whole student is needed.
- ``FullyShardedStage`` (``distributed.strategy: fsdp``, stages that are not layer-local): a sharded copy
  of teacher and student (``fully_shard`` on every decoder layer and the root) trains on each rank's
  slice of the batch; the full weights are gathered back into the plain student for checkpoints,
  evaluation and the stages that follow.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from mixerdistill.checkpoint import assign_weights
from mixerdistill.distributed.world import World
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.stages import Stage
from mixerdistill.student import mixer_layers

PRECISIONS = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Running:
    """A stage as a plan runs it: the stage object whose loss is computed, the module that trains
    (the student, or its sharded copy) and the parameters the optimizer updates on this rank."""

    stage: Stage
    module: nn.Module
    parameters: list[nn.Parameter]


class Plan(Protocol):
    """What the training loop asks of a plan, step by step."""

    layout: str  # how optimizer states are saved; a resumed run must find the same layout

    def describe(self) -> str:
        """One phrase for the log, e.g. 'data parallel over 2 processes'."""

    def prepare(self, stage: Stage, model: nn.Module, parameters: list[nn.Parameter]) -> Running:
        """Before the first step: what trains on this rank."""

    def batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a (B, T) global batch."""

    def loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """This rank's loss (a tensor with grad) and metrics (tensors or floats) on its batch."""

    def reduce(self, loss: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        """The global loss (detached tensor) and metrics of this step, the same on every rank."""

    def grad_norm(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        """The global gradient norm (a tensor: no host sync)."""

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state as a progress checkpoint stores it (collective)."""

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore what ``optimizer_state`` gave."""

    def sync(self, model: nn.Module) -> None:
        """Make ``model`` (the plain student) hold the current weights on every rank."""

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The module that evaluates the current weights (called on every rank)."""

    def finish(self, model: nn.Module) -> None:
        """After the last step: the plain student holds the trained weights on every rank."""


def check_batch_sizes(recipe, world: World) -> None:
    """Every data-parallel stage's global batch must split evenly over the ranks."""
    problems = [
        (
            f"stages.{i}.batch_size",
            f"{block.config.batch_size} sequences per step do not split evenly over {world.size} processes; "
            f"use a multiple of {world.size}",
        )
        for i, block in enumerate(recipe.stages)
        if block.config.batch_size % world.size and not uses_layer_parallel(recipe, block)
    ]
    if problems:
        raise RecipeError(problems, f"a run on {world.size} processes")


def uses_layer_parallel(recipe, block) -> bool:
    from mixerdistill.plugins import get_stage

    return recipe.distributed.layer_parallel and get_stage(block.name).layer_local


def plan_for(recipe, block, world: World, device: torch.device) -> Plan:
    """The plan that runs stage ``block`` of ``recipe`` on ``world``."""
    if not world.active:
        return SingleProcess()
    if uses_layer_parallel(recipe, block):
        return LayerParallel(world)
    from mixerdistill.plugins import get_stage

    if recipe.distributed.strategy == "fsdp" and not get_stage(block.name).layer_local:
        return FullyShardedStage(world, device, PRECISIONS[recipe.distributed.mixed_precision])
    return DataParallel(world, device)


def average_over_ranks(world: World, loss: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
    """Data-parallel step figures: the mean over ranks of the loss and of each metric, in one collective
    (float64, so the mean is exact); the loss keeps its dtype."""
    values = torch.stack(
        [
            loss.detach().double().reshape(()),
            *(torch.as_tensor(v, dtype=torch.float64, device=loss.device).reshape(()) for v in extra.values()),
        ]
    )
    averaged = world.average(values)
    return averaged[0].to(loss.dtype), dict(zip(extra, averaged[1:]))


def shard_rows(batch: torch.Tensor, world: World) -> torch.Tensor:
    """Rank r's contiguous slice of a (B, T) global batch: rows [r·B/n, (r+1)·B/n)."""
    local = batch.shape[0] // world.size
    return batch[world.rank * local : (world.rank + 1) * local]


class SingleProcess:
    """One process: every step of the loop as it always was."""

    layout = "replicated"  # how optimizer states are saved: one state every rank loads

    def describe(self) -> str:
        return "one process"

    def prepare(self, stage: Stage, model: nn.Module, parameters: list[nn.Parameter]) -> Running:
        self.running = Running(stage, model, parameters)
        return self.running

    def loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.running.stage.loss(input_ids)

    def batch(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def reduce(self, loss: torch.Tensor, extra: dict) -> tuple[torch.Tensor, dict]:
        """The global loss (detached) and metrics of this step."""
        return loss, extra

    def grad_norm(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if state.get("layout", self.layout) != self.layout:
            raise UserError(
                f"the progress checkpoint holds {state['layout']} optimizer states, this run needs "
                f"{self.layout} ones: resume with the distributed settings the run started with"
            )
        optimizer.load_state_dict(state)

    def sync(self, model: nn.Module) -> None:
        """Make ``model`` (the plain student) hold the current weights on every rank."""

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The module that evaluates the current weights (called on every rank)."""
        self.sync(model)
        return model

    def finish(self, model: nn.Module) -> None:
        """After the last step: the plain student holds the trained weights on every rank."""
        self.sync(model)


class DataParallel(SingleProcess):
    """Rank r trains on its slice of each global batch; DistributedDataParallel, wrapped around the
    stage's loss (stages 1–2 call mixers and blocks directly, not ``student.forward``), all-reduces
    and averages the gradients during backward. Each stage averages its loss over the batch, so the
    mean of equal local batches' gradients is the single-process gradient."""

    def __init__(self, world: World, device: torch.device):
        self.world = world
        self.device = device

    def describe(self):
        return f"data parallel over {self.world.size} processes"

    def prepare(self, stage, model, parameters):
        from torch.nn.parallel import DistributedDataParallel

        super().prepare(stage, model, parameters)
        # find_unused_parameters: a plugin stage may name parameters its loss does not always reach.
        self.wrapped = DistributedDataParallel(
            _StageLoss(stage, model),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
            find_unused_parameters=True,
        )
        return self.running

    def loss(self, input_ids):
        return self.wrapped(input_ids)

    def batch(self, batch):
        return shard_rows(batch, self.world)

    def reduce(self, loss, extra):
        return average_over_ranks(self.world, loss, extra)

    def finish(self, model):
        self.wrapped = None


class _StageLoss(nn.Module):
    """``forward(input_ids)`` is the stage's loss; the student is a submodule so DDP finds its parameters."""

    def __init__(self, stage: Stage, model: nn.Module):
        super().__init__()
        self.stage = stage
        self.model = model

    def forward(self, input_ids):
        return self.stage.loss(input_ids)


class LayerParallel(SingleProcess):
    """Each rank owns a contiguous block of the replaced layers and trains them on the whole global
    batch (a layer-local loss gives exactly the single-process gradients of its own layers)."""

    layout = "layer_parallel"

    def __init__(self, world: World):
        self.world = world

    def describe(self):
        return f"layer parallel over {self.world.size} processes"

    def prepare(self, stage, model, parameters):
        layers = sorted(stage.context.mixers)
        if len(layers) < self.world.size:
            raise UserError(
                f"distributed.layer_parallel: {len(layers)} replaced layer(s) cannot be spread over "
                f"{self.world.size} processes; use fewer processes or layer_parallel: false"
            )
        chunks = [
            layers[r * len(layers) // self.world.size : (r + 1) * len(layers) // self.world.size]
            for r in range(self.world.size)
        ]
        self.owner = {idx: rank for rank, chunk in enumerate(chunks) for idx in chunk}
        # One stage per layer names that layer's parameters (used to broadcast them from their owner).
        self.layer_parameters = {
            idx: list(dict.fromkeys(stage.restrict([idx]).trainable_parameters())) for idx in layers
        }
        own = stage.restrict(chunks[self.world.rank])
        self.running = Running(own, model, list(dict.fromkeys(own.trainable_parameters())))
        return self.running

    def reduce(self, loss, extra):
        total = loss.detach().to(self.world.collective_device, torch.float64).clone()
        dist.all_reduce(total)
        gathered: list[dict] = [{} for _ in range(self.world.size)]
        # each rank's own layers' metrics (a host copy: objects are pickled)
        dist.all_gather_object(gathered, {k: torch.as_tensor(v).detach().cpu() for k, v in extra.items()})
        return total.to(loss.dtype).cpu(), {k: v for part in gathered for k, v in part.items()}

    def grad_norm(self, parameters):
        local = super().grad_norm(parameters)
        squared = (local.double() ** 2).reshape(1).to(self.world.collective_device)
        dist.all_reduce(squared)
        return squared.sqrt().to(local.device, local.dtype).reshape(())

    def optimizer_state(self, optimizer):
        states = [None] * self.world.size
        dist.all_gather_object(states, optimizer.state_dict())
        return {"layout": self.layout, "ranks": states}

    def load_optimizer_state(self, optimizer, state):
        if state.get("layout") != self.layout or len(state["ranks"]) != self.world.size:
            raise UserError(
                f"the progress checkpoint was not written by a layer-parallel run on {self.world.size} "
                f"processes: resume with the distributed settings and process count it started with"
            )
        optimizer.load_state_dict(state["ranks"][self.world.rank])

    def sync(self, model):
        for idx, parameters in self.layer_parameters.items():
            for p in parameters:
                dist.broadcast(p.data, src=self.owner[idx])


def _full(value):
    """A sharded (DTensor) value gathered whole, on the CPU; anything else as it is."""
    return value.full_tensor().cpu() if hasattr(value, "full_tensor") else value


class FullyShardedStage(SingleProcess):
    """FSDP2 (``fully_shard``) on a copy of teacher and student: each decoder layer and the root are
    sharded over the ranks, so a rank's device holds a 1/N share of both models' weights, gradients
    and optimizer states while the stage runs. The plain models wait in host memory."""

    layout = "fsdp"

    def __init__(self, world: World, device: torch.device, precision: torch.dtype | None):
        self.world = world
        self.device = device
        self.precision = precision

    def describe(self):
        return f"fully sharded (FSDP) over {self.world.size} processes"

    def prepare(self, stage, model, parameters):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.type, (self.world.size,))
        context = stage.context
        self.plain = {"student": model, "teacher": context.teacher}
        # The copies keep the plain models' requires_grad flags (the stage's trainable parameters).
        sharded = {name: self._shard(module.to("cpu"), context.adapter, mesh) for name, module in self.plain.items()}
        sharded_stage = stage.on_context(
            dataclasses.replace(
                context,
                teacher=sharded["teacher"],
                student=sharded["student"],
                mixers=mixer_layers(sharded["student"], context.adapter),
                teacher_attention={},
            )
        )
        self.running = Running(
            sharded_stage, sharded["student"], [p for p in sharded["student"].parameters() if p.requires_grad]
        )
        return self.running

    def _shard(self, module: nn.Module, adapter, mesh) -> nn.Module:
        """A copy of ``module`` with every decoder layer and the root sharded over ``mesh``'s ranks."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        copied = copy.deepcopy(module)
        policy = MixedPrecisionPolicy(
            param_dtype=self.precision, reduce_dtype=torch.float32 if self.precision is not None else None
        )
        for layer in adapter.layers(copied):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(copied, mesh=mesh, mp_policy=policy)
        return copied

    def batch(self, batch):
        return shard_rows(batch, self.world)

    def reduce(self, loss, extra):
        return average_over_ranks(self.world, loss, extra)

    def grad_norm(self, parameters):
        norm = super().grad_norm(parameters)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_state(self, optimizer):
        """The optimizer's state with every sharded tensor gathered whole (collective)."""
        state = optimizer.state_dict()
        state["state"] = {
            key: {name: _full(value) for name, value in entry.items()} for key, entry in state["state"].items()
        }
        return {"layout": self.layout, "state": state}

    def load_optimizer_state(self, optimizer, state):
        from torch.distributed.tensor import DTensor, distribute_tensor

        if state.get("layout") != self.layout:
            return super().load_optimizer_state(optimizer, state)
        saved = state["state"]
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for key, entry in saved["state"].items():
            parameter = parameters[int(key)]
            if isinstance(parameter, DTensor):
                entry.update(
                    {
                        name: distribute_tensor(value.to(parameter.device), parameter.device_mesh, parameter.placements)
                        for name, value in entry.items()
                        if value.shape == parameter.shape
                    }
                )
        optimizer.load_state_dict(saved)

    def sync(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            self.running.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        # cpu_offload gathers the full tensors on rank 0 only; every rank needs them.
        payload = [full if self.world.main else None]
        dist.broadcast_object_list(payload, src=0, device=torch.device(self.world.collective_device))
        assign_weights(model, payload[0])  # never writes into the teacher's storage (mixerdistill.student)

    def evaluation_model(self, model):
        return self.running.module

    def finish(self, model):
        self.sync(model)
        for plain in self.plain.values():
            plain.to(self.device)
        self.running = None
