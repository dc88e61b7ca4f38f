"""Teacher adapter for the Llama family (Llama, SmolLM2, Qwen2, Mistral): pre-norm blocks, full RoPE, GQA."""

from __future__ import annotations

import torch
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import AttentionGeometry, AttentionWeights
from mixerdistill.teacher import TeacherAdapter


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


class LlamaAdapter(TeacherAdapter):
    """``model.model.layers[i]``: input_layernorm → self_attn (q/k/v/o_proj) → post_attention_layernorm → mlp."""

    name = "llama"
    model_types = ("llama", "qwen2", "mistral")

    def norms(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.input_layernorm, layer.post_attention_layernorm]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def geometry(self, config, layer_idx: int) -> AttentionGeometry:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        qwen2 = config.model_type == "qwen2"  # Qwen2 hard-codes q/k/v biases and a bias-free o_proj
        attention_bias = True if qwen2 else bool(getattr(config, "attention_bias", False))
        return AttentionGeometry(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rotary_dim=head_dim,
            layer_idx=layer_idx,
            attention_bias=attention_bias,
            output_bias=False if qwen2 else attention_bias,
        )

    def attention_weights(self, attention: nn.Module) -> AttentionWeights:
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        return AttentionWeights(
            q=q.weight.detach(), k=k.weight.detach(), v=v.weight.detach(), o=o.weight.detach(),
            q_bias=_bias(q), k_bias=_bias(k), v_bias=_bias(v), o_bias=_bias(o),
        )


@hookimpl
def register_teachers(register):
    register("llama", LlamaAdapter())
