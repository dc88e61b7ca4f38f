"""The three MOHAWK stages.

1. matrix_orientation      ‖A_teacher − M_student‖_F per (batch, head), every replaced layer at once
2. hidden_state_alignment  ‖student block(x) − teacher block(x)‖₂ per token, every replaced layer at once
3. knowledge_distillation  KL(teacher softmax ‖ student softmax) on the logits, end to end

Stages 1 and 2 are layer-local: one teacher forward gives every layer's input and target, the layer
losses are summed and one backward trains all layers.
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from mixerdistill.hookspecs import hookimpl
from mixerdistill.logits import chunked_distillation_loss
from mixerdistill.mixer import MatrixRows
from mixerdistill.stages import Stage, StageConfig, teacher_attention_mixer
from mixerdistill.teacher import trace_teacher


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)


BLOCKWISE_FROM = 1024  # seq_len from which the blockwise loss is also the faster one (docs/performance.md)
MATERIALISED_BUFFERS = 6  # (B, H, T, T) fp32 buffers per layer the materialised loss holds for its backward


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, else the host's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def matrix_distance(student: MatrixRows, teacher: MatrixRows, length: int, block_rows: int | None = None,
                    sink_tokens: int = 0) -> torch.Tensor:
    """‖M_student − A_teacher‖_F per (batch, head): (B, H), from two ``MatrixRows`` over T = ``length`` tokens.

    ``block_rows`` None: both (B, H, T, T) matrices at once. Otherwise blocks of that many query rows, each
    under activation checkpointing: its (B, H, r, ≤T) tensors are freed after the forward and rebuilt one
    block at a time in the backward, so memory is O(r·T) instead of O(T²) for the same loss and gradients.
    The first ``sink_tokens`` columns of the teacher's matrix are zeroed (see ``MatrixOrientation.Config``).
    """
    def squared(start: int, stop: int) -> torch.Tensor:  # (B, H): Σ over the block of (M − A)²
        with torch.no_grad():
            target = teacher(start, stop)
            target[..., :sink_tokens] = 0
        return (student(start, stop) - target).square().sum((-1, -2))

    if block_rows is None or block_rows >= length:
        return squared(0, length).sqrt()
    total = sum(checkpoint(squared, start, min(start + block_rows, length), use_reentrant=False)
                for start in range(0, length, block_rows))
    return total.sqrt()


class MatrixOrientation(Stage):
    """Stage 1: match each teacher attention matrix with the student mixer's materialised matrix."""

    layer_local = True

    class Config(StageConfig):
        # Weight decay defaults to 0 here: projection rows that do not shape the matrix get no
        # gradient in this stage and would only be decayed. lr 2e-4 is the published stage-1 rate.
        optimizer_defaults: ClassVar[dict] = {"lr": 2e-4, "weight_decay": 0.0}
        sink_tokens: int = Field(
            0, ge=0, description="Treat the first k tokens of each window as attention sinks: their columns of "
                                 "the teacher's matrix become 0 in the target. Mid-depth SmolLM2 layers put "
                                 "40-60% of every row on token 0, which a decaying mixer cannot copy and which "
                                 "then dominates the distance (70-90% of it).")
        matrix_loss: Literal["auto", "blockwise", "materialised"] = Field(
            "auto", description="How the matrices are compared. 'materialised': every layer's (B, H, T, T) "
                                "teacher and student matrices at once. 'blockwise': blocks of block_rows query "
                                "rows, each rebuilt in the backward pass (memory O(block_rows·T) per layer, "
                                "same loss and gradients). 'auto': blockwise from seq_len 1024 (where it is "
                                "also the faster one on CPU) or when the materialised matrices would take more "
                                "than half the free memory.")
        block_rows: int = Field(128, ge=1, description="Query rows per block of the blockwise matrix loss.")

    def __init__(self, config, context):
        super().__init__(config, context)
        for idx in context.mixers:
            if idx not in context.teacher_attention:
                context.teacher_attention[idx] = teacher_attention_mixer(context.teacher, context.adapter, idx)

    def trainable_parameters(self):
        return [p for mixer in self.context.mixers.values() for p in mixer.matrix_parameters()]

    def block_rows(self, batch: int, length: int, device: torch.device) -> int | None:
        """Rows per block of the matrix loss for a (batch, length) input; None: materialised."""
        config = self.config
        if config.matrix_loss != "auto":
            return config.block_rows if config.matrix_loss == "blockwise" else None
        heads = sum(mixer.geometry.num_heads for mixer in self.context.mixers.values())
        materialised_bytes = MATERIALISED_BUFFERS * batch * heads * length**2 * 4
        if length >= BLOCKWISE_FROM or materialised_bytes > free_memory(device) / 2:
            return config.block_rows
        return None

    def loss(self, input_ids):
        context = self.context
        trace = trace_teacher(context.teacher, context.adapter, input_ids, record={"mixer_inputs"},
                              layers=set(context.mixers))
        total = 0.0
        metrics = {}
        block_rows = self.block_rows(*input_ids.shape, input_ids.device)
        for idx, mixer in context.mixers.items():
            hidden = trace.mixer_inputs[idx]  # (B, T, D), already normalised
            with torch.no_grad():
                target = context.teacher_attention[idx].matrix_rows(hidden, trace.rotary(idx))
            distance = matrix_distance(mixer.matrix_rows(hidden, trace.rotary(idx)), target, input_ids.shape[1],
                                       block_rows, self.config.sink_tokens).mean()
            metrics[f"layer_{idx}"] = distance.item()
            total = total + distance
        return total, metrics


class HiddenStateAlignment(Stage):
    """Stage 2: match each student block's output to the teacher's, given the teacher's block input."""

    layer_local = True

    class Config(StageConfig):
        target: Literal["block", "mixer"] = Field(
            "block", description="'block': whole decoder block output; 'mixer': the mixer's output only.")
        trainable: list[Literal["mixer", "mlp", "norms"]] = Field(
            default_factory=lambda: ["mixer"],
            description="Parameter groups of the replaced blocks that learn (MOHAWK: the mixer only).")
        distance: Literal["l2", "relative"] = Field(
            "l2", description="Per-token distance: 'l2' is ‖out − target‖₂ (MOHAWK); 'relative' divides it by "
                              "‖target‖₂, so tokens with massive activations (e.g. attention sinks, norms "
                              "of 1e4 in SmolLM2's middle layers) do not drown out the rest.")

        recompute: bool = Field(
            True, description="Recompute each layer's forward in the backward pass (activation checkpointing): "
                              "the backward holds one layer's activations instead of every layer's (SmolLM2, "
                              "30 discrete Mamba-2 layers at 4 × 256 tokens: 47 MB instead of 1.4 GB) for one "
                              "more forward of the mixers.")

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
        record = {"block_inputs", "block_outputs"} if self.config.target == "block" else {
            "mixer_inputs", "mixer_outputs"}
        trace = trace_teacher(context.teacher, context.adapter, input_ids, record=record,
                              layers=set(context.mixers))
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
            inputs, target = ((trace.block_inputs[idx], trace.block_outputs[idx]) if self.config.target == "block"
                              else (trace.mixer_inputs[idx], trace.mixer_outputs[idx]))
            if self.config.recompute:
                distance = checkpoint(layer_distance, idx, inputs, target, use_reentrant=False)
            else:
                distance = layer_distance(idx, inputs, target)
            metrics[f"layer_{idx}"] = distance.item()
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
                        "tied LM head) and kept attention layers. Freezing saves their weight gradients.")

    def trainable_parameters(self):
        context = self.context
        adapter, student = context.adapter, context.student
        layers = adapter.layers(student)
        groups = {
            "mlp": lambda: [p for layer in layers for p in adapter.mlp(layer).parameters()],
            "norms": lambda: [p for layer in layers for norm in adapter.norms(layer) for p in norm.parameters()]
            + list(adapter.final_norm(student).parameters()),
            "embeddings": lambda: list(student.get_input_embeddings().parameters())
            + list(student.get_output_embeddings().parameters()),
            "attention": lambda: [p for i, layer in enumerate(layers) if i not in context.mixers
                                  for p in adapter.attention(layer).parameters()],
        }
        frozen = {id(p) for group in self.config.freeze for p in groups[group]()}
        return [p for p in student.parameters() if id(p) not in frozen]

    def loss(self, input_ids):
        """KL of the student's next-token distribution from the teacher's (× temperature²), plus the weighted
        cross-entropy on the text; the vocabulary is handled a chunk of tokens at a time (mixerdistill.logits)."""
        context = self.context
        kl, ce = chunked_distillation_loss(context.student, context.teacher, input_ids, self.config.temperature)
        metrics = {"kl": kl.item()}
        total = self.config.kd_weight * kl
        if self.config.ce_weight > 0:
            metrics["ce"] = ce.item()
            total = total + self.config.ce_weight * ce
        return total, metrics


@hookimpl
def register_stages(register):
    register("matrix_orientation", MatrixOrientation)
    register("hidden_state_alignment", HiddenStateAlignment)
    register("knowledge_distillation", KnowledgeDistillation)
