"""The three MOHAWK stages.

1. matrix_orientation      ‖A_teacher − M_student‖_F per (batch, head), every replaced layer at once
2. hidden_state_alignment  ‖student block(x) − teacher block(x)‖₂ per token, every replaced layer at once
3. knowledge_distillation  KL(teacher softmax ‖ student softmax) on the logits, end to end

Stages 1 and 2 are layer-local: one teacher forward gives every layer's input and target, the layer
losses are summed and one backward trains all layers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from mixerdistill.hookspecs import hookimpl
from mixerdistill.logits import chunked_distillation_loss
from mixerdistill.matrix_loss import MatrixLoss, choose_matrix_loss, matrix_distance
from mixerdistill.stages import Stage, StageConfig, teacher_attention_mixer
from mixerdistill.teacher import trace_teacher


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)


class MatrixOrientation(Stage):
    """Stage 1: match each teacher attention matrix with the student mixer's materialised matrix."""

    layer_local = True

    class Config(StageConfig):
        # Weight decay defaults to 0 here: projection rows that do not shape the matrix get no
        # gradient in this stage and would only be decayed. lr 2e-4 is the published stage-1 rate.
        optimizer_defaults: ClassVar[dict] = {"lr": 2e-4, "weight_decay": 0.0}
        sink_tokens: int = Field(
            0,
            ge=0,
            description="Treat the first k tokens of each window as attention sinks: their columns of "
            "the teacher's matrix become 0 in the target. Mid-depth SmolLM2 layers put "
            "40-60% of every row on token 0, which a decaying mixer cannot copy and which "
            "then dominates the distance (70-90% of it).",
        )
        matrix_loss: MatrixLoss = Field(
            "auto",
            description="How the matrices are compared. 'materialised': every layer's (B, H, T, T) "
            "teacher and student matrices at once. 'blockwise': blocks of block_rows query "
            "rows, each rebuilt in the backward pass (memory O(block_rows·T) per layer, "
            "same loss and gradients). 'auto': blockwise from seq_len 1024 (where it is "
            "also the faster one on CPU) or when the materialised matrices of a step would "
            "take more than 4 GiB; decided from the shapes alone and recorded in the run's "
            "resolved recipe.yaml.",
        )
        block_rows: int = Field(128, ge=1, description="Query rows per block of the blockwise matrix loss.")
        recompute: bool = Field(
            True,
            description="With the materialised matrix loss, rebuild each layer's matrices in the backward "
            "pass (activation checkpointing): the backward holds one layer's (B, H, T, T) "
            "intermediates instead of every layer's (the SmolLM2 demo's 30 window-attention + "
            "Mamba-2 layers at 4 × 256 tokens: a 7.0 GB peak becomes 3.6 GB) for one more "
            "forward of the matrices. The blockwise loss rebuilds its blocks anyway.",
        )

    def __init__(self, config, context):
        super().__init__(config, context)
        self._add_teacher_attention()

    def on_context(self, context):
        stage = super().on_context(context)
        stage._add_teacher_attention()
        return stage

    def _add_teacher_attention(self) -> None:
        """The frozen teacher attention of every replaced layer, whose matrices are the targets."""
        context = self.context
        for idx in context.mixers:
            if idx not in context.teacher_attention:
                context.teacher_attention[idx] = teacher_attention_mixer(context.teacher, context.adapter, idx)

    def trainable_parameters(self):
        return [p for mixer in self.context.mixers.values() for p in mixer.matrix_parameters()]

    @classmethod
    def resolve(cls, config, context):
        """``matrix_loss: auto`` made concrete from the step's shapes and the replaced layers' heads."""
        heads = sum(mixer.geometry.num_heads for mixer in context.mixers.values())
        choice = choose_matrix_loss(config.matrix_loss, config.batch_size, config.seq_len, heads)
        return config.model_copy(update={"matrix_loss": choice})

    def block_rows(self) -> int | None:
        """Rows per block of the matrix loss; None: materialised (``auto`` resolved by ``resolve``)."""
        return self.config.block_rows if self.resolve(self.config, self.context).matrix_loss == "blockwise" else None

    def loss(self, input_ids):
        context = self.context
        trace = trace_teacher(
            context.teacher, context.adapter, input_ids, record={"mixer_inputs"}, layers=set(context.mixers)
        )
        block_rows = self.block_rows()

        def layer_distance(idx: int, hidden: torch.Tensor) -> torch.Tensor:
            """Mean matrix distance of layer ``idx`` on the teacher's normalised mixer ``hidden`` (B, T, D)."""
            with torch.no_grad():
                target = context.teacher_attention[idx].matrix_rows(hidden, trace.rotary(idx))
            student = context.mixers[idx].matrix_rows(hidden, trace.rotary(idx))
            return matrix_distance(student, target, input_ids.shape[1], block_rows, self.config.sink_tokens).mean()

        total = 0.0
        metrics = {}
        for idx in context.mixers:
            hidden = trace.mixer_inputs[idx]
            if self.config.recompute and block_rows is None:
                distance = checkpoint(layer_distance, idx, hidden, use_reentrant=False)
            else:
                distance = layer_distance(idx, hidden)
            metrics[f"layer_{idx}"] = distance.detach()
            total = total + distance
        return total, metrics


class HiddenStateAlignment(Stage):
    """Stage 2: match each student block's output to the teacher's, given the teacher's block input."""

    layer_local = True

    class Config(StageConfig):
        target: Literal["block", "mixer"] = Field(
            "block", description="'block': whole decoder block output; 'mixer': the mixer's output only."
        )
        trainable: list[Literal["mixer", "mlp", "norms"]] = Field(
            default_factory=lambda: ["mixer"],
            description="Parameter groups of the replaced blocks that learn (MOHAWK: the mixer only).",
        )
        distance: Literal["l2", "relative"] = Field(
            "l2",
            description="Per-token distance: 'l2' is ‖out − target‖₂ (MOHAWK); 'relative' divides it by "
            "‖target‖₂, so tokens with massive activations (e.g. attention sinks, norms "
            "of 1e4 in SmolLM2's middle layers) do not drown out the rest.",
        )

        recompute: bool = Field(
            True,
            description="Recompute each layer's forward in the backward pass (activation checkpointing): "
            "the backward holds one layer's activations instead of every layer's (SmolLM2, "
            "30 discrete Mamba-2 layers at 4 × 256 tokens: 47 MB instead of 1.4 GB) for one "
            "more forward of the mixers.",
        )

    def trainable_parameters(self):
        context = self.context
        layers = context.adapter.layers(context.student)
        parameters = []
        for idx, mixer in context.mixers.items():
            if "mixer" in self.config.trainable:
                parameters += list(mixer.parameters())
            if "mlp" in self.config.trainable:
                parameters += list(context.adapter.mlp(layers[idx]).parameters())
            if "norms" in self.config.trainable:
                parameters += [p for norm in context.adapter.norms(layers[idx]) for p in norm.parameters()]
        return parameters

    def loss(self, input_ids):
        context = self.context
        record = (
            {"block_inputs", "block_outputs"} if self.config.target == "block" else {"mixer_inputs", "mixer_outputs"}
        )
        trace = trace_teacher(context.teacher, context.adapter, input_ids, record=record, layers=set(context.mixers))
        layers = context.adapter.layers(context.student)
        positions = _positions(input_ids)

        def layer_distance(idx: int, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """Mean per-token distance of layer ``idx``'s output on the teacher's ``inputs`` from ``target``."""
            if self.config.target == "block":
                output = context.adapter.run_block(layers[idx], inputs, trace.rotary(idx), positions)
            else:
                output, _ = context.mixers[idx](inputs, rotary=trace.rotary(idx))
            distance = (output - target).norm(dim=-1)  # (B, T) per-token L2
            if self.config.distance == "relative":
                distance = distance / target.norm(dim=-1).clamp_min(1e-6)
            return distance.mean()

        total = 0.0
        metrics = {}
        for idx in context.mixers:
            inputs, target = (
                (trace.block_inputs[idx], trace.block_outputs[idx])
                if self.config.target == "block"
                else (trace.mixer_inputs[idx], trace.mixer_outputs[idx])
            )
            if self.config.recompute:
                distance = checkpoint(layer_distance, idx, inputs, target, use_reentrant=False)
            else:
                distance = layer_distance(idx, inputs, target)
            metrics[f"layer_{idx}"] = distance.detach()
            total = total + distance
        return total, metrics


class KnowledgeDistillation(Stage):
    """Stage 3: end-to-end distillation from the teacher's logits."""

    class Config(StageConfig):
        temperature: float = Field(1.0, gt=0, description="Softmax temperature of teacher and student.")
        kd_weight: float = Field(1.0, ge=0, description="Weight of the distillation (KL) term.")
        ce_weight: float = Field(0.0, ge=0, description="Weight of the next-token cross-entropy on the text.")
        freeze: list[Literal["mlp", "norms", "embeddings", "attention"]] = Field(
            default_factory=list,
            description="Parameter groups kept at the teacher's weights: MLPs, norms, embeddings (with a "
            "tied LM head) and kept attention layers. Freezing saves their weight gradients.",
        )
        recompute: bool = Field(
            True,
            description="Recompute each student block's forward in the backward pass (transformers' "
            "activation checkpointing): the backward holds the blocks' inputs instead of all their "
            "activations (SmolLM2's 30 blocks at 4 × 256 tokens: ≈ 2 GB fewer at the peak) for one "
            "more forward of the student.",
        )

    def trainable_parameters(self):
        context = self.context
        adapter, student = context.adapter, context.student
        layers = adapter.layers(student)
        groups = {
            "mlp": lambda: [p for layer in layers for p in adapter.mlp(layer).parameters()],
            "norms": lambda: (
                [p for layer in layers for norm in adapter.norms(layer) for p in norm.parameters()]
                + list(adapter.final_norm(student).parameters())
            ),
            "embeddings": lambda: (
                list(student.get_input_embeddings().parameters()) + list(student.get_output_embeddings().parameters())
            ),
            "attention": lambda: [
                p
                for i, layer in enumerate(layers)
                if i not in context.mixers
                for p in adapter.attention(layer).parameters()
            ],
        }
        frozen = {id(p) for group in self.config.freeze for p in groups[group]()}
        return [p for p in student.parameters() if id(p) not in frozen]

    def loss(self, input_ids):
        """KL of the student's next-token distribution from the teacher's (× temperature²), plus the weighted
        cross-entropy on the text; the vocabulary is handled a chunk of tokens at a time (mixerdistill.logits)."""
        context = self.context
        with block_recompute(context.student, self.config.recompute):
            loss = chunked_distillation_loss(
                context.student,
                context.teacher,
                input_ids,
                self.config.temperature,
                kd_weight=self.config.kd_weight,
                ce_weight=self.config.ce_weight,
            )
        metrics = {"kl": loss.kl}
        if self.config.ce_weight > 0:
            metrics["ce"] = loss.ce
        return loss.loss, metrics


@contextmanager
def block_recompute(model: nn.Module, enabled: bool):
    """Within the block, ``model``'s forward saves only each decoder block's inputs for the backward, which
    recomputes the block (transformers' activation checkpointing; families without it run as they are).
    The backward may run after the block: the recompute is recorded in the autograd graph."""
    if not enabled or not getattr(model, "supports_gradient_checkpointing", False):
        yield
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.activation_checkpointing_disable()


@hookimpl
def register_stages(register):
    register("matrix_orientation", MatrixOrientation)
    register("hidden_state_alignment", HiddenStateAlignment)
    register("knowledge_distillation", KnowledgeDistillation)
