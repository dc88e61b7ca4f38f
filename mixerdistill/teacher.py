"""Teacher adapters (one per Hugging Face model family) and the teacher trace used by stages 1–2.

An adapter knows where a family keeps its decoder blocks, attention modules, q/k/v/o weights, rotary
embedding and pre-mixer norm. Everything else in mixerdistill talks to models only through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mixerdistill.mixer import AttentionGeometry, AttentionWeights, RotaryEmbedding


class TeacherAdapter:
    """Base adapter. The defaults follow the common transformers decoder layout
    (``model.model.layers[i]`` with ``self_attn``, ``input_layernorm``, ``mlp`` and
    ``model.model.rotary_emb``); subclasses override what their family does differently.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # `config.model_type` values this adapter handles

    # -- structure -----------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module (or the student mixer that replaced it) of one block."""
        return layer.self_attn

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        """Put ``module`` where the block's attention was."""
        layer.self_attn = module

    def mixer_norm(self, layer: nn.Module) -> nn.Module:
        """The norm applied to the block input before attention."""
        return layer.input_layernorm

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        """Every norm inside one block (frozen in stage 2 by default)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm after the last block, before the LM head."""
        raise NotImplementedError

    def geometry(self, config, layer_idx: int) -> AttentionGeometry:
        raise NotImplementedError

    def attention_weights(self, attention: nn.Module) -> AttentionWeights:
        raise NotImplementedError

    def qk_norms(self, attention: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        """Per-head norms applied to q and k before RoPE, where the family has them."""
        return None, None

    # -- running pieces ------------------------------------------------------------------------
    def rotary(self, model: nn.Module, hidden_states: torch.Tensor,
               position_ids: torch.Tensor) -> RotaryEmbedding:
        """(cos, sin) for ``position_ids`` (B, T), as the family's model computes them."""
        return model.model.rotary_emb(hidden_states, position_ids)

    def run_block(self, layer: nn.Module, hidden_states: torch.Tensor, rotary: RotaryEmbedding,
                  position_ids: torch.Tensor) -> torch.Tensor:
        """One decoder block on (B, T, D) without a cache, causal; returns (B, T, D).

        A teacher attention module gets the causal mask its attention implementation needs (eager
        attention is not causal without one); a student mixer ignores the mask.
        """
        from transformers.masking_utils import create_causal_mask

        config = getattr(self.attention(layer), "config", None)
        mask = None if config is None else create_causal_mask(
            config=config, inputs_embeds=hidden_states, attention_mask=None, cache=None, position_ids=position_ids)
        output = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                       position_embeddings=rotary)
        return output[0] if isinstance(output, tuple) else output

    def matches(self, config) -> bool:
        return getattr(config, "model_type", None) in self.model_types


def find_adapter(config, requested: str | None = None) -> TeacherAdapter:
    """The adapter named ``requested``, or the one whose ``model_types`` include ``config.model_type``."""
    from mixerdistill.errors import UserError
    from mixerdistill.plugins import registry

    teachers = registry("teachers")
    if requested:
        return teachers.get(requested)
    for name in teachers.names():
        adapter = teachers.get(name)
        if adapter.matches(config):
            return adapter
    raise UserError(
        f"no teacher adapter handles model_type '{getattr(config, 'model_type', '?')}'; "
        f"available adapters: {', '.join(teachers.names())} (set teacher.adapter, or install a plugin)"
    )


@dataclass
class TeacherTrace:
    """What one teacher forward recorded, per decoder block (lists indexed by layer).

    mixer_inputs / mixer_outputs: (B, T, D) input to attention (already normalised) and its output.
    block_inputs / block_outputs: (B, T, D) residual stream entering and leaving the block.
    rotary: the (cos, sin) the model passed to its attention modules, or None.
    """

    mixer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    mixer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    rotary: RotaryEmbedding = None
    logits: torch.Tensor | None = None


TRACE_FIELDS = ("mixer_inputs", "mixer_outputs", "block_inputs", "block_outputs")


@torch.no_grad()
def trace_teacher(model: nn.Module, adapter: TeacherAdapter, input_ids: torch.Tensor,
                  record: set[str], layers: set[int] | None = None,
                  keep_logits: bool = False) -> TeacherTrace:
    """Run the teacher once on ``input_ids`` (B, T) and record the requested per-block tensors.

    ``record`` is a subset of TRACE_FIELDS; ``layers`` restricts which blocks are recorded. When no
    logits are wanted the forward stops after the last recorded block.
    """
    unknown = set(record) - set(TRACE_FIELDS)
    if unknown:
        raise ValueError(f"unknown trace fields {sorted(unknown)}")
    trace = TeacherTrace()
    blocks = adapter.layers(model)
    wanted = set(range(len(blocks))) if layers is None else set(layers)
    handles = []

    def record_input(store: dict, idx: int, args, kwargs) -> None:
        store[idx] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()
        if trace.rotary is None and kwargs.get("position_embeddings") is not None:
            trace.rotary = tuple(t.detach() for t in kwargs["position_embeddings"])

    for idx, block in enumerate(blocks):
        if idx not in wanted:
            continue
        attention = adapter.attention(block)
        if "mixer_inputs" in record or "mixer_outputs" in record:
            def attention_pre(module, args, kwargs, _idx=idx):
                record_input(trace.mixer_inputs, _idx, args, kwargs)

            def attention_post(module, args, kwargs, output, _idx=idx):
                out = output[0] if isinstance(output, tuple) else output
                trace.mixer_outputs[_idx] = out.detach()

            handles.append(attention.register_forward_pre_hook(attention_pre, with_kwargs=True))
            if "mixer_outputs" in record:
                handles.append(attention.register_forward_hook(attention_post, with_kwargs=True))

        def block_pre(module, args, kwargs, _idx=idx):
            record_input(trace.block_inputs, _idx, args, kwargs)

        def block_post(module, args, kwargs, output, _idx=idx):
            out = output[0] if isinstance(output, tuple) else output
            trace.block_outputs[_idx] = out.detach()
            if not keep_logits and _idx == max(wanted):
                raise _StopForward

        handles.append(block.register_forward_pre_hook(block_pre, with_kwargs=True))
        handles.append(block.register_forward_hook(block_post, with_kwargs=True))
    try:
        output = model(input_ids=input_ids, use_cache=False)
        trace.logits = output.logits if keep_logits else None
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    for name in TRACE_FIELDS:
        if name not in record:
            getattr(trace, name).clear()
    return trace


class _StopForward(Exception):
    """Raised inside a hook to end a teacher forward once every needed block has run."""
