"""Teacher adapter for Phi (Phi-1, Phi-1.5, Phi-2): parallel blocks, partial RoPE, biases everywhere."""

from __future__ import annotations

from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import AttentionGeometry, AttentionWeights
from mixerdistill.teacher import TeacherAdapter


class PhiAdapter(TeacherAdapter):
    """``model.model.layers[i]``: one input_layernorm feeds self_attn (q/k/v_proj, dense) and mlp in parallel."""

    name = "phi"
    model_types = ("phi",)

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.input_layernorm]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.final_layernorm

    def geometry(self, config, layer_idx: int) -> AttentionGeometry:
        if getattr(config, "qk_layernorm", False):
            raise NotImplementedError(
                "Phi with qk_layernorm=True (per-head LayerNorm on q and k) is not supported by the 'phi' adapter"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # transformers 5 keeps partial_rotary_factor in rope_parameters (4.x: a top-level attribute)
        rope = getattr(config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        return AttentionGeometry(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * factor),
            layer_idx=layer_idx,
            attention_bias=True,
            output_bias=True,
        )

    def attention_weights(self, attention: nn.Module) -> AttentionWeights:
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.dense
        return AttentionWeights(
            q=q.weight.detach(), k=k.weight.detach(), v=v.weight.detach(), o=o.weight.detach(),
            q_bias=q.bias.detach(), k_bias=k.bias.detach(), v_bias=v.bias.detach(), o_bias=o.bias.detach(),
        )


@hookimpl
def register_teachers(register):
    register("phi", PhiAdapter())
