"""Softmax attention as a SequenceMixer: the teacher's own mixer, used for hybrids and stage-1 targets.

Computes exactly what a Llama/Phi attention layer computes (GQA, partial RoPE, causal softmax) from its
own q/k/v/o projections, so the teacher's attention matrices come from q/k without an eager-attention
copy of the whole model. The recurrent state is the KV cache: {"k", "v"} each (B, T_seen, H_kv, d),
keys stored after RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import (AttentionGeometry, AttentionWeights, MatrixRows, MixerConfig, RotaryEmbedding,
                                SequenceMixer, State)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(…, r) → (−x₂, x₁): the RoPE convention of transformers (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, rotary: RotaryEmbedding, rotary_dim: int) -> torch.Tensor:
    """RoPE on the first ``rotary_dim`` dims of each head: x (B, T, H, d), cos/sin (B or 1, T, rotary_dim)."""
    if rotary_dim == 0:
        return x
    if rotary is None:
        raise ValueError(f"this attention layer applies RoPE to {rotary_dim} dims per head but got no rotary")
    cos, sin = (t.unsqueeze(2).to(x.dtype) for t in rotary)
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, T, H_kv, d) → (B, T, H_kv·groups, d); query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """(queries, keys) bool, True where allowed: the queries are the last ``queries`` of ``keys`` positions."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


class AttentionMixer(SequenceMixer):
    """Causal softmax attention with grouped KV heads and (partial) rotary position embedding."""

    class Config(MixerConfig):
        """No options: the geometry fixes everything."""

    state_grows = True  # the KV cache

    def __init__(self, geometry: AttentionGeometry, config: MixerConfig):
        super().__init__(geometry, config)
        g = geometry
        self.groups = g.query_groups
        self.q_proj = nn.Linear(g.hidden_size, g.num_heads * g.head_dim, bias=g.attention_bias)
        self.k_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        self.v_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        self.o_proj = nn.Linear(g.num_heads * g.head_dim, g.hidden_size, bias=g.output_bias)

    def _qkv(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding):
        """(B, T, D) → q (B, T, H, d), k and v (B, T, H_kv, d); q and k rotated."""
        batch, length, _ = hidden_states.shape
        g = self.geometry
        q = self.q_proj(hidden_states).view(batch, length, g.num_heads, g.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, g.num_kv_heads, g.head_dim)
        v = self.v_proj(hidden_states).view(batch, length, g.num_kv_heads, g.head_dim)
        return apply_rotary(q, rotary, g.rotary_dim), apply_rotary(k, rotary, g.rotary_dim), v

    def _probabilities(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q (B, Tq, H, d), k (B, Tk, H_kv, d) → causal softmax (B, H, Tq, Tk), queries last in the sequence."""
        scores = torch.einsum("bqhd,bkhd->bhqk", q, repeat_kv(k, self.groups)).mul_(self.geometry.scale)
        scores.masked_fill_(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)

    def forward(self, hidden_states: torch.Tensor, state: State | None = None,
                rotary: RotaryEmbedding = None) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and the KV cache; with ``state`` the tokens also attend to its keys."""
        batch, length, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, rotary)
        if state is not None:
            k = torch.cat((state["k"], k), dim=1)
            v = torch.cat((state["v"], v), dim=1)
        past = k.shape[1] - length
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), repeat_kv(k, self.groups).transpose(1, 2), repeat_kv(v, self.groups).transpose(1, 2),
            attn_mask=causal_mask(length, k.shape[1], q.device) if past else None,
            is_causal=not past, scale=self.geometry.scale,
        )
        y = y.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(y), {"k": k, "v": v}

    def mixing_matrix(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → attention probabilities (B, H, T, T), zero above the diagonal."""
        return self.matrix_rows(hidden_states, rotary)(0, hidden_states.shape[1])

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → rows(start, stop): the probabilities of queries start … stop−1 over keys 0 … stop−1;
        keeps only q and k (B, T, ·, d)."""
        q, k, _ = self._qkv(hidden_states, rotary)
        return lambda start, stop: self._probabilities(q[:, start:stop], k[:, :stop])

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → (B, T, D) as o_proj(M @ v) with M the explicit probabilities."""
        batch, length, _ = hidden_states.shape
        _, _, v = self._qkv(hidden_states, rotary)
        y = torch.einsum("bhqk,bkhd->bqhd", self.mixing_matrix(hidden_states, rotary), repeat_kv(v, self.groups))
        return self.o_proj(y.reshape(batch, length, -1))

    def init_state(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> State:
        """An empty KV cache: k and v (B, 0, H_kv, d)."""
        g = self.geometry
        reference = self.k_proj.weight
        empty = torch.zeros(batch_size, 0, g.num_kv_heads, g.head_dim,
                            device=device or reference.device, dtype=dtype or reference.dtype)
        return {"k": empty, "v": empty.clone()}

    def step(self, hidden_state: torch.Tensor, state: State,
             rotary: RotaryEmbedding = None) -> tuple[torch.Tensor, State]:
        """One token (B, D) with rotary (cos, sin) each (B, rotary_dim) → (B, D) and the grown cache."""
        rotary = None if rotary is None else tuple(t.unsqueeze(1) for t in rotary)
        output, state = self(hidden_state.unsqueeze(1), state=state, rotary=rotary)
        return output.squeeze(1), state

    @classmethod
    def from_attention(cls, weights: AttentionWeights, geometry: AttentionGeometry,
                       config: MixerConfig) -> "AttentionMixer":
        """An exact copy of the teacher layer's projections, on their device and dtype."""
        mixer = cls(geometry, config).to(device=weights.q.device, dtype=weights.q.dtype)
        with torch.no_grad():
            for linear, weight, bias in ((mixer.q_proj, weights.q, weights.q_bias),
                                         (mixer.k_proj, weights.k, weights.k_bias),
                                         (mixer.v_proj, weights.v, weights.v_bias),
                                         (mixer.o_proj, weights.o, weights.o_bias)):
                if (linear.bias is None) != (bias is None):
                    raise ValueError("the teacher's attention biases do not match the geometry's "
                                     f"attention_bias={geometry.attention_bias}, output_bias={geometry.output_bias}")
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
        return mixer


@hookimpl
def register_mixers(register):
    register("attention", AttentionMixer)
