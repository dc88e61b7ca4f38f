"""StarCoder2 (bigcode/starcoder2-3b, -7b, -15b) as a mixerdistill teacher.

StarCoder2's decoder is Llama's layout: ``model.layers[i]`` runs ``input_layernorm`` → ``self_attn``
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, grouped kv heads, full RoPE from ``model.rotary_emb``,
scale 1/√d, ``config.sliding_window`` on every layer) → ``post_attention_layernorm`` → ``mlp``, and
``model.norm`` after the last block. Its attention differs from Llama's in one thing: all four projections
carry a bias when ``config.use_bias`` (Llama's config calls it ``attention_bias``). LayerNorms with biases
and the ``c_fc`` → GELU → ``c_proj`` MLP sit outside attention; the student keeps them as they are.
"""

from __future__ import annotations

from mixerdistill.hookspecs import hookimpl
from mixerdistill.teacher import DeclaredAdapter


class Starcoder2Adapter(DeclaredAdapter):
    """StarCoder2: Llama's layout with LayerNorm blocks, and biases on q/k/v and o when ``use_bias``."""

    name = "starcoder2"
    model_types = ("starcoder2",)

    def biases(self, config) -> tuple[bool, bool]:
        """(q/k/v projections have biases, o_proj has one): StarCoder2's ``use_bias`` sets both."""
        return config.use_bias, config.use_bias


@hookimpl
def register_teachers(register):
    register("starcoder2", Starcoder2Adapter())
