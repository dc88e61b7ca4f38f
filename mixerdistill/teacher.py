"""Teacher adapters (one per Hugging Face model family) and the teacher trace used by stages 1–2.

An adapter knows where a family keeps its decoder blocks, attention modules, q/k/v/o weights, q/k norms,
rotary embedding and norms, and what its attention computes (``AttentionGeometry``). Everything else in
mixerdistill talks to models only through it. The built-in families are ``DeclaredAdapter`` subclasses
(``plugins/families.py``) that only declare what differs from the common layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mixerdistill.mixer import AttentionGeometry, AttentionWeights, QKNorm, RotaryEmbedding


class TeacherAdapter:
    """What mixerdistill needs to know about one model family. ``DeclaredAdapter`` implements it for the
    common transformers decoder layouts from a few declarations; a family that fits none of them
    subclasses this directly.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # `config.model_type` values this adapter handles

    # -- structure -----------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention module (or the student mixer that replaced it) of one block."""
        raise NotImplementedError

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        """Put ``module`` where the block's attention was."""
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        """Every norm inside one block (frozen in stage 2 by default)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm after the last block, before the LM head."""
        raise NotImplementedError

    def geometry(self, config, layer_idx: int) -> AttentionGeometry:
        """Layer ``layer_idx``'s attention as the ``attention`` mixer must compute it."""
        raise NotImplementedError

    def attention_weights(self, attention: nn.Module) -> AttentionWeights:
        """A teacher attention module's q/k/v/o (and q/k norm) weights, in ``AttentionWeights`` layout."""
        raise NotImplementedError

    # -- running pieces ------------------------------------------------------------------------
    def rotary(
        self, model: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_idx: int = 0
    ) -> RotaryEmbedding:
        """(cos, sin) for ``position_ids`` (B, T) as the model computes them for layer ``layer_idx``; None
        for families without RoPE."""
        raise NotImplementedError

    def run_block(
        self, layer: nn.Module, hidden_states: torch.Tensor, rotary: RotaryEmbedding, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """One decoder block on (B, T, D) without a cache, causal; returns (B, T, D).

        A teacher attention module gets the causal (or sliding-window) mask its attention implementation
        needs (eager attention is not causal without one); a student mixer ignores the mask.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        attention = self.attention(layer)
        config = getattr(attention, "config", None)
        mask = None
        if config is not None:
            windowed = self.geometry(config, attention.layer_idx).sliding_window is not None
            make_mask = create_sliding_window_causal_mask if windowed else create_causal_mask
            mask = make_mask(
                config=config, inputs_embeds=hidden_states, attention_mask=None, cache=None, position_ids=position_ids
            )
        output = layer(hidden_states, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        return output[0] if isinstance(output, tuple) else output

    def matches(self, config) -> bool:
        return getattr(config, "model_type", None) in self.model_types


def module_at(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path`` "a.b.c"; an AttributeError names the missing step."""
    for step in path.split("."):
        if not hasattr(root, step):
            raise AttributeError(f"{type(root).__name__} has no '{step}' (looking for '{path}')")
        root = getattr(root, step)
    return root


def _detached(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a projection in (out, in) layout; transformers' GPT-2 ``Conv1D`` stores (in, out)."""
    weight = linear.weight.detach()
    if type(linear).__name__ == "Conv1D":
        weight = weight.t()
    return weight, None if getattr(linear, "bias", None) is None else linear.bias.detach()


class DeclaredAdapter(TeacherAdapter):
    """A ``TeacherAdapter`` made of declarations: where the family keeps its modules (dotted attribute
    paths) and what its attention does that plain Llama attention does not. A family subclasses it and
    sets the class attributes that differ; ``geometry`` reads the rest from the transformers config
    (``head_dim``, ``num_key_value_heads``, ``rope_parameters.partial_rotary_factor``,
    ``attn_logit_softcapping``, ``layer_types`` with ``sliding_window``).
    """

    # where things are: paths from the CausalLM (layers, final_norm, rotary_emb) or from one block
    layers_path: ClassVar[str] = "model.layers"
    attention_name: ClassVar[str] = "self_attn"
    mlp_name: ClassVar[str] = "mlp"
    norm_names: ClassVar[tuple[str, ...]] = ("input_layernorm", "post_attention_layernorm")
    final_norm_path: ClassVar[str] = "model.norm"
    rotary_path: ClassVar[str | None] = "model.rotary_emb"  # None: no RoPE (learned positions)
    rotary_per_layer_type: ClassVar[bool] = False  # rotary_emb(x, positions, layer_type) (Gemma 3)
    # the projections, in the attention module: q, k, v, o — or one fused qkv and o
    projection_names: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj")
    fused_qkv: ClassVar[str | None] = None  # "concat" (rows q, then k, then v), "per_head" (rows per head: q_h k_h v_h)
    # the q/k norm: None, "head" or "projection" (see QKNorm); weight = offset + w
    qk_norm_names: ClassVar[tuple[str, str]] = ("q_norm", "k_norm")
    qk_norm_scope: ClassVar[str | None] = None
    qk_norm_offset: ClassVar[float] = 0.0
    rotary_interleaved: ClassVar[bool] = False
    unsupported: ClassVar[dict[str, object]] = {}  # config attribute → the value this adapter cannot handle

    # -- structure -----------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return module_at(model, self.layers_path)

    def attention(self, layer: nn.Module) -> nn.Module:
        return module_at(layer, self.attention_name)

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        setattr(layer, self.attention_name, module)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return module_at(layer, self.mlp_name)

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        return [norm for norm in (module_at(layer, name) for name in self.norm_names) if norm is not None]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return module_at(model, self.final_norm_path)

    # -- the attention -------------------------------------------------------------------------
    def softmax_scale(self, config, layer_idx: int) -> float | None:
        """The factor on q·k; None for 1/√head_dim."""
        return None

    def biases(self, config) -> tuple[bool, bool]:
        """(q/k/v projections have biases, output projection has one)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def rotary_dim(self, config, layer_idx: int, head_dim: int) -> int:
        if self.rotary_path is None:
            return 0
        rope = getattr(config, "rope_parameters", None) or {}
        return int(head_dim * rope.get("partial_rotary_factor", 1.0))

    def geometry(self, config, layer_idx: int) -> AttentionGeometry:
        from mixerdistill.errors import UserError

        for option, bad in self.unsupported.items():
            if getattr(config, option, None) == bad:
                raise UserError(f"the '{self.name}' teacher adapter does not support {option}={bad!r}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias, output_bias = self.biases(config)
        eps = getattr(config, "rms_norm_eps", None) or getattr(config, "layer_norm_eps", 1e-6)
        return AttentionGeometry(
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rotary_dim=self.rotary_dim(config, layer_idx, head_dim),
            layer_idx=layer_idx,
            attention_bias=qkv_bias,
            output_bias=output_bias,
            softmax_scale=self.softmax_scale(config, layer_idx),
            rotary_interleaved=self.rotary_interleaved,
            qk_norm=QKNorm(self.qk_norm_scope, eps, self.qk_norm_offset) if self.qk_norm_scope else None,
            logit_softcap=getattr(config, "attn_logit_softcapping", None),
            sliding_window=sliding_window(config, layer_idx),
        )

    def attention_weights(self, attention: nn.Module) -> AttentionWeights:
        *qkv_names, o_name = self.projection_names
        o, o_bias = _detached(module_at(attention, o_name))
        if self.fused_qkv is None:
            (q, q_bias), (k, k_bias), (v, v_bias) = (_detached(module_at(attention, n)) for n in qkv_names)
        else:
            g = self.geometry(attention.config, attention.layer_idx)
            weight, bias = _detached(module_at(attention, qkv_names[0]))
            (q, k, v), (q_bias, k_bias, v_bias) = (
                split_qkv(t, g, self.fused_qkv) if t is not None else (None,) * 3 for t in (weight, bias)
            )
        q_norm = k_norm = None
        if self.qk_norm_scope:
            q_norm, k_norm = (module_at(attention, n).weight.detach() for n in self.qk_norm_names)
        return AttentionWeights(
            q=q, k=k, v=v, o=o, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias, q_norm=q_norm, k_norm=k_norm
        )

    def rotary(
        self, model: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor, layer_idx: int = 0
    ) -> RotaryEmbedding:
        if self.rotary_path is None:
            return None
        rotary_emb = module_at(model, self.rotary_path)
        if self.rotary_per_layer_type:
            return rotary_emb(hidden_states, position_ids, model.config.layer_types[layer_idx])
        return rotary_emb(hidden_states, position_ids)


def sliding_window(config, layer_idx: int) -> int | None:
    """The layer's attention window: per ``config.layer_types`` where the config has them (Gemma 2/3,
    Qwen2/3), else ``config.sliding_window`` for every layer (Mistral, Phi-3); None for full attention."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


def split_qkv(fused: torch.Tensor, geometry: AttentionGeometry, layout: str) -> tuple[torch.Tensor, ...]:
    """A fused qkv weight (rows, D) or bias (rows,) → q (H·d, …), k and v (H_kv·d, …).

    "concat": rows are all of q, then k, then v (Phi-3, GPT-2's ``c_attn``); "per_head": rows run over
    heads, each head's q, k, v rows together (GPT-NeoX: the output is viewed as (…, H, 3·d)).
    """
    g = geometry
    if layout == "concat":
        return fused.split([g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim, g.num_kv_heads * g.head_dim])
    if layout == "per_head":
        per_head = fused.view(g.num_heads, 3, g.head_dim, *fused.shape[1:])
        return tuple(per_head[:, part].reshape(g.num_heads * g.head_dim, *fused.shape[1:]) for part in range(3))
    raise ValueError(f"unknown fused qkv layout {layout!r}")


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
    rotaries: the (cos, sin) the model passed to each recorded block (None without RoPE); layers of one
    kind share one pair, and Gemma 3's local and global layers get different ones.
    """

    mixer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    mixer_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    rotaries: dict[int, RotaryEmbedding] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def rotary(self, layer_idx: int) -> RotaryEmbedding:
        """The (cos, sin) layer ``layer_idx`` received, each (B, T, rotary_dim); None without RoPE."""
        return self.rotaries.get(layer_idx)


TRACE_FIELDS = ("mixer_inputs", "mixer_outputs", "block_inputs", "block_outputs")


@torch.no_grad()
def trace_teacher(
    model: nn.Module,
    adapter: TeacherAdapter,
    input_ids: torch.Tensor,
    record: set[str],
    layers: set[int] | None = None,
    keep_logits: bool = False,
) -> TeacherTrace:
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
        if kwargs.get("position_embeddings") is not None:
            trace.rotaries[idx] = tuple(t.detach() for t in kwargs["position_embeddings"])

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
