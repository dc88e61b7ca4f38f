"""Teacher adapters for the transformers decoder families, each a declaration of what differs from the
common layout (``DeclaredAdapter``): ``model.model.layers[i]`` with ``input_layernorm`` → ``self_attn``
(q/k/v/o_proj, full RoPE from ``model.model.rotary_emb``, 1/√d scale) → ``post_attention_layernorm`` → ``mlp``.

Embedding scales, residual multipliers, parallel blocks, post-norms and final logit soft-capping live
outside the attention module, so a family that differs only there needs nothing declared for them: the
student keeps the teacher's blocks and model class. Every declaration is checked by
``mixerdistill.testing.check_adapter`` on a tiny random model of the family (``TINY_CONFIGS``).
"""

from __future__ import annotations

from mixerdistill.hookspecs import hookimpl
from mixerdistill.teacher import DeclaredAdapter


class LlamaAdapter(DeclaredAdapter):
    """Llama, SmolLM2, Mistral (a sliding window on every layer), Qwen2 (q/k/v biases, none on o)."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2")

    def biases(self, config) -> tuple[bool, bool]:
        if config.model_type == "qwen2":  # Qwen2 hard-codes q/k/v biases and a bias-free o_proj
            return True, False
        return super().biases(config)


class Qwen3Adapter(DeclaredAdapter):
    """Qwen3: an RMS norm on each head of q and k, before RoPE."""

    name = "qwen3"
    model_types = ("qwen3",)
    qk_norm_scope = "head"


class Olmo2Adapter(DeclaredAdapter):
    """OLMo 2: post-norm blocks (no norm before attention) and an RMS norm over the whole q and k projections."""

    name = "olmo2"
    model_types = ("olmo2",)
    norm_names = ("post_attention_layernorm", "post_feedforward_layernorm")
    qk_norm_scope = "projection"


class GemmaAdapter(DeclaredAdapter):
    """Gemma: (1 + w) RMS norms and a √D embedding scale, both outside attention; attention is Llama's."""

    name = "gemma"
    model_types = ("gemma",)


class Gemma2Adapter(DeclaredAdapter):
    """Gemma 2: scale 1/√query_pre_attn_scalar, soft-capped attention logits, sliding-window layers,
    four norms per block."""

    name = "gemma2"
    model_types = ("gemma2",)
    norm_names = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )

    def softmax_scale(self, config, layer_idx: int) -> float | None:
        return config.query_pre_attn_scalar**-0.5


class Gemma3Adapter(Gemma2Adapter):
    """Gemma 3: Gemma 2 plus (1 + w) q/k norms per head, and local (sliding) layers with their own RoPE base."""

    name = "gemma3"
    model_types = ("gemma3_text",)
    qk_norm_scope = "head"
    qk_norm_offset = 1.0
    rotary_per_layer_type = True


class GraniteAdapter(DeclaredAdapter):
    """Granite: the softmax scale is ``attention_multiplier`` (embedding, residual and logit multipliers
    sit outside attention)."""

    name = "granite"
    model_types = ("granite",)

    def softmax_scale(self, config, layer_idx: int) -> float | None:
        return config.attention_multiplier


class CohereAdapter(DeclaredAdapter):
    """Cohere (Command-R): parallel blocks with one LayerNorm, interleaved-pair RoPE."""

    name = "cohere"
    model_types = ("cohere",)
    norm_names = ("input_layernorm",)
    rotary_interleaved = True
    unsupported = {"use_qk_norm": True}  # a LayerNorm with one weight per head


class PhiAdapter(DeclaredAdapter):
    """Phi-1/1.5/2: parallel blocks with one LayerNorm, partial RoPE, biases everywhere, output ``dense``."""

    name = "phi"
    model_types = ("phi",)
    norm_names = ("input_layernorm",)
    final_norm_path = "model.final_layernorm"
    projection_names = ("q_proj", "k_proj", "v_proj", "dense")
    unsupported = {"qk_layernorm": True}  # a LayerNorm with bias on q and k

    def biases(self, config) -> tuple[bool, bool]:
        return True, True


class Phi3Adapter(DeclaredAdapter):
    """Phi-3: one fused ``qkv_proj`` (rows q, then k, then v), no biases."""

    name = "phi3"
    model_types = ("phi3",)
    projection_names = ("qkv_proj", "o_proj")
    fused_qkv = "concat"


class StableLmAdapter(DeclaredAdapter):
    """StableLM: LayerNorm blocks (optionally parallel), partial RoPE, optional q/k/v biases, none on o."""

    name = "stablelm"
    model_types = ("stablelm",)
    unsupported = {"qk_layernorm": True}  # a LayerNorm per head, each with its own weight

    def biases(self, config) -> tuple[bool, bool]:
        return bool(config.use_qkv_bias), False


class SmolLM3Adapter(DeclaredAdapter):
    """SmolLM3: Llama layers, every ``no_rope_layer_interval``-th of them without RoPE (NoPE)."""

    name = "smollm3"
    model_types = ("smollm3",)

    def rotary_dim(self, config, layer_idx: int, head_dim: int) -> int:
        return super().rotary_dim(config, layer_idx, head_dim) if config.no_rope_layers[layer_idx] else 0


class GPTNeoXAdapter(DeclaredAdapter):
    """GPT-NeoX / Pythia: one fused ``query_key_value`` with rows per head (q_h, k_h, v_h), partial RoPE,
    parallel residual, output ``dense``."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    attention_name = "attention"
    final_norm_path = "gpt_neox.final_layer_norm"
    rotary_path = "gpt_neox.rotary_emb"
    projection_names = ("query_key_value", "dense")
    fused_qkv = "per_head"


class GPT2Adapter(DeclaredAdapter):
    """GPT-2: learned positions (no RoPE), one fused ``c_attn`` (Conv1D, columns q, k, v), LayerNorm blocks."""

    name = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    attention_name = "attn"
    norm_names = ("ln_1", "ln_2")
    final_norm_path = "transformer.ln_f"
    rotary_path = None
    projection_names = ("c_attn", "c_proj")
    fused_qkv = "concat"
    unsupported = {"add_cross_attention": True}

    def biases(self, config) -> tuple[bool, bool]:
        return True, True

    def softmax_scale(self, config, layer_idx: int) -> float | None:
        scale = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
        return scale / (layer_idx + 1) if config.scale_attn_by_inverse_layer_idx else scale


ADAPTERS = (
    LlamaAdapter,
    Qwen3Adapter,
    Olmo2Adapter,
    GemmaAdapter,
    Gemma2Adapter,
    Gemma3Adapter,
    GraniteAdapter,
    CohereAdapter,
    PhiAdapter,
    Phi3Adapter,
    StableLmAdapter,
    SmolLM3Adapter,
    GPTNeoXAdapter,
    GPT2Adapter,
)


@hookimpl
def register_teachers(register):
    for adapter in ADAPTERS:
        register(adapter.name, adapter())
