"""The Stage interface: a loss and a set of trainable parameters; the training loop does the rest."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from mixerdistill.mixer import SequenceMixer
from mixerdistill.teacher import TeacherAdapter


class OptimizerConfig(BaseModel):
    """AdamW settings."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam β1, β2.")
    eps: float = Field(1e-8, gt=0, description="Adam ε.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay (matrices only, never norms/biases).")
    state_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Where AdamW keeps its two moments: bfloat16 halves the optimizer's memory (stochastic "
        "rounding, fp32 arithmetic; mixerdistill.optimizers).",
    )

    @model_validator(mode="after")
    def _betas_in_range(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class ScheduleConfig(BaseModel):
    """Learning-rate schedule over the stage's steps."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["constant", "cosine", "wsd"] = Field(
        "wsd", description="constant, cosine (to min_lr_ratio), or warmup-stable-decay."
    )
    warmup: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent warming up linearly.")
    decay: float = Field(0.1, ge=0, le=1, description="wsd: fraction of steps spent decaying linearly at the end.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak.")

    @model_validator(mode="after")
    def _phases_fit(self):
        if self.name == "wsd" and self.warmup + self.decay > 1:
            raise ValueError(f"warmup + decay must not exceed 1, got {self.warmup} + {self.decay}")
        return self

    def factor(self, step: int, total: int) -> float:
        """The lr multiplier for 0-based ``step`` of ``total``."""
        warmup_steps = int(round(self.warmup * total))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if self.name == "constant":
            return 1.0
        if self.name == "cosine":
            import math

            progress = (step - warmup_steps) / max(1, total - warmup_steps)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = int(round(self.decay * total))
        decay_start = total - decay_steps
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, decay_steps)
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


class StageConfig(BaseModel):
    """Fields every stage has; a stage's own Config subclasses this.

    ``optimizer_defaults`` lets a stage change AdamW defaults; they apply whether or not the recipe
    gives an ``optimizer`` block, unless the recipe sets the field itself.
    """

    model_config = ConfigDict(extra="forbid")
    optimizer_defaults: ClassVar[dict] = {}
    tokens: int = Field(gt=0, description="Training tokens for this stage (steps = tokens / (batch_size·seq_len)).")
    batch_size: int = Field(4, ge=1, description="Sequences per step.")
    seq_len: int = Field(256, ge=2, description="Tokens per sequence.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW settings.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null: no clipping.")
    seed: int | None = Field(None, description="Data-order seed; default: recipe seed + stage index.")
    skip_nonfinite: int = Field(
        0,
        ge=0,
        description="Skip up to this many steps whose loss or gradient is NaN/inf "
        "(no optimizer step) before stopping the stage.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_optimizer_defaults(cls, data):
        if cls.optimizer_defaults and isinstance(data, dict):
            given = data.get("optimizer", {})
            if isinstance(given, dict):
                data = {**data, "optimizer": {**cls.optimizer_defaults, **given}}
        return data

    def steps(self) -> int:
        return max(1, -(-self.tokens // (self.batch_size * self.seq_len)))

    def tokens_rounded(self) -> int:
        """Tokens actually trained: whole steps of batch_size × seq_len."""
        return self.steps() * self.batch_size * self.seq_len


def teacher_attention_mixer(teacher: nn.Module, adapter: TeacherAdapter, idx: int) -> SequenceMixer:
    """Layer ``idx`` of the teacher as a frozen softmax-attention SequenceMixer (its matrices are stage 1's
    targets), on the teacher's device and dtype."""
    from mixerdistill.plugins import get_mixer

    attention_cls = get_mixer("attention")
    attention = adapter.attention(adapter.layers(teacher)[idx])
    mixer = attention_cls.from_attention(
        adapter.attention_weights(attention), adapter.geometry(teacher.config, idx), attention_cls.Config()
    )
    reference = next(attention.parameters())
    return mixer.to(reference.device, reference.dtype).requires_grad_(False)


@dataclass
class StageContext:
    """What a stage works on."""

    teacher: nn.Module
    student: nn.Module
    adapter: TeacherAdapter
    mixers: dict[int, SequenceMixer]  # replaced layers of the student: {layer index: mixer}
    teacher_attention: dict[int, SequenceMixer] = field(default_factory=dict)  # frozen teacher attention as mixers


class Stage:
    """One MOHAWK stage (or a plugin's own): names trainable parameters and computes a batch loss."""

    Config: ClassVar[type[StageConfig]] = StageConfig
    # Layer-local: the loss is a sum of per-layer terms, each depending only on its own layer's parameters
    # and the teacher (so `distributed.layer_parallel` may train the layers on different ranks).
    layer_local: ClassVar[bool] = False

    def __init__(self, config: StageConfig, context: StageContext):
        self.config = config
        self.context = context

    @classmethod
    def resolve(cls, config: StageConfig, context: StageContext) -> StageConfig:
        """``config`` with every automatic choice made from the recipe and the models' shapes (never the
        machine's state), before the run records its resolved recipe. Default: ``config`` as it is."""
        return config

    def on_context(self, context: StageContext) -> Stage:
        """This stage working on ``context`` instead (other layers, sharded copies of the models).
        Default: a shallow copy holding ``context``; a stage that derives state from its context
        overrides it."""
        stage = copy.copy(self)
        stage.context = context
        return stage

    def restrict(self, layers: list[int]) -> Stage:
        """This stage over only ``layers`` of the replaced layers (a layer-parallel rank's share)."""
        return self.on_context(dataclasses.replace(self.context, mixers={i: self.context.mixers[i] for i in layers}))

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Scalar loss for one (B, T) batch and extra metrics to log (e.g. per-layer distances): detached
        0-d tensors, so the loop copies them to the host once per logged step."""
        raise NotImplementedError
