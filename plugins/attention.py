"""Softmax attention as a SequenceMixer: the teacher's own mixer, used for hybrids and stage-1 targets.

Computes exactly what the attention layer of every supported family computes from its own q/k/v/o
projections — GQA, q/k norms (per head or over the projection, Gemma's (1 + w)), full, partial or
interleaved RoPE or none, any softmax scale, logit soft-capping, sliding windows — as the layer's
``AttentionGeometry`` describes, so the teacher's attention matrices come from q/k without an
eager-attention copy of the whole model. The recurrent state is the KV cache: {"k", "v"} each
(B, T_seen, H_kv, d), keys stored after RoPE.

``window_attention`` is the same attention restricted to the last W tokens, with a constant-size state: the
last W − 1 keys and values (for hybrids and the ``sum`` mixer's local part).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import (
    AttentionGeometry,
    AttentionWeights,
    MatrixRows,
    MixerConfig,
    QKNorm,
    RotaryEmbedding,
    SequenceMixer,
    State,
)


def rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(…, r) → (−x₂, x₁) over halves (transformers' usual RoPE), or over pairs (2i, 2i+1) when interleaved."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, rotary: RotaryEmbedding, rotary_dim: int, interleaved: bool = False) -> torch.Tensor:
    """RoPE on the first ``rotary_dim`` dims of each head: x (B, T, H, d), cos/sin (B or 1, T, rotary_dim)."""
    if rotary_dim == 0:
        return x
    if rotary is None:
        raise ValueError(f"this attention layer applies RoPE to {rotary_dim} dims per head but got no rotary")
    cos, sin = (t.unsqueeze(2).to(x.dtype) for t in rotary)
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x, interleaved) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate_half(rot, interleaved) * sin, rest), dim=-1)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, T, H_kv, d) → (B, T, H_kv·groups, d); query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def causal_mask(queries: int, keys: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """(queries, keys) bool, True where allowed: the queries are the last ``queries`` of ``keys`` positions;
    with a ``window``, query i sees only keys j with i − j < window."""
    allowed = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)
    return allowed if window is None else allowed.triu(diagonal=keys - queries - window + 1)


class QKNormLayer(nn.Module):
    """RMS norm of q or k as ``QKNorm`` describes: x / sqrt(mean(x²) + eps) · (offset + w), computed in fp32."""

    def __init__(self, width: int, norm: QKNorm):
        super().__init__()
        self.norm = norm
        self.weight = nn.Parameter(torch.full((width,), 1.0 - norm.offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (…, width) → (…, width)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        return (normed * (self.norm.offset + self.weight.float())).to(x.dtype)


class AttentionMixer(SequenceMixer):
    """Causal softmax attention with grouped KV heads, optional q/k norms, (partial) rotary position embedding,
    soft-capped logits and a sliding window, as the geometry says."""

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
        if g.qk_norm is not None:
            per_head = g.qk_norm.scope == "head"
            self.q_norm = QKNormLayer(g.head_dim if per_head else g.num_heads * g.head_dim, g.qk_norm)
            self.k_norm = QKNormLayer(g.head_dim if per_head else g.num_kv_heads * g.head_dim, g.qk_norm)

    def _project(self, hidden_states: torch.Tensor):
        """(B, T, D) → q (B, T, H, d), k and v (B, T, H_kv, d): projected and q/k-normed, not yet rotated."""
        batch, length, _ = hidden_states.shape
        g = self.geometry
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if g.qk_norm is not None and g.qk_norm.scope == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, length, g.num_heads, g.head_dim)
        k = k.view(batch, length, g.num_kv_heads, g.head_dim)
        if g.qk_norm is not None and g.qk_norm.scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v.view(batch, length, g.num_kv_heads, g.head_dim)

    def _qkv(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding):
        """(B, T, D) → q (B, T, H, d), k and v (B, T, H_kv, d); q and k normed and rotated."""
        g = self.geometry
        q, k, v = self._project(hidden_states)
        return (
            apply_rotary(q, rotary, g.rotary_dim, g.rotary_interleaved),
            apply_rotary(k, rotary, g.rotary_dim, g.rotary_interleaved),
            v,
        )

    def _probabilities(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q (B, Tq, H, d), k (B, Tk, H_kv, d) → causal softmax (B, H, Tq, Tk), queries last in the sequence."""
        g = self.geometry
        scores = torch.einsum("bqhd,bkhd->bhqk", q, repeat_kv(k, self.groups)).mul_(g.scale)
        if g.logit_softcap is not None:
            scores = torch.tanh(scores / g.logit_softcap) * g.logit_softcap
        scores.masked_fill_(~causal_mask(q.shape[1], k.shape[1], q.device, g.sliding_window), float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)

    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and the KV cache; with ``state`` the tokens also attend to its keys."""
        batch, length, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, rotary)
        if state is not None:
            k = torch.cat((state["k"], k), dim=1)
            v = torch.cat((state["v"], v), dim=1)
        g = self.geometry
        if g.logit_softcap is not None:  # scaled_dot_product_attention cannot soft-cap
            y = torch.einsum("bhqk,bkhd->bqhd", self._probabilities(q, k), repeat_kv(v, self.groups))
        else:
            plain_causal = k.shape[1] == length and g.sliding_window is None
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                repeat_kv(k, self.groups).transpose(1, 2),
                repeat_kv(v, self.groups).transpose(1, 2),
                attn_mask=None if plain_causal else causal_mask(length, k.shape[1], q.device, g.sliding_window),
                is_causal=plain_causal,
                scale=g.scale,
            ).transpose(1, 2)
        return self.o_proj(y.reshape(batch, length, -1)), {"k": k, "v": v}

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

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """An empty KV cache: k and v (B, 0, H_kv, d)."""
        g = self.geometry
        reference = self.k_proj.weight
        empty = torch.zeros(
            batch_size, 0, g.num_kv_heads, g.head_dim, device=device or reference.device, dtype=dtype or reference.dtype
        )
        return {"k": empty, "v": empty.clone()}

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token (B, D) with rotary (cos, sin) each (B, rotary_dim) → (B, D) and the grown cache."""
        rotary = None if rotary is None else tuple(t.unsqueeze(1) for t in rotary)
        output, state = self(hidden_state.unsqueeze(1), state=state, rotary=rotary)
        return output.squeeze(1), state

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: MixerConfig
    ) -> AttentionMixer:
        """An exact copy of the teacher layer's projections (and q/k norms), on their device and dtype."""
        mixer = cls(geometry, config).to(device=weights.q.device, dtype=weights.q.dtype)
        if (geometry.qk_norm is None) != (weights.q_norm is None or weights.k_norm is None):
            raise ValueError(
                f"the geometry's qk_norm={geometry.qk_norm} does not match the teacher's q/k norm "
                f"weights ({'none' if weights.q_norm is None else 'present'})"
            )
        with torch.no_grad():
            if geometry.qk_norm is not None:
                mixer.q_norm.weight.copy_(weights.q_norm)
                mixer.k_norm.weight.copy_(weights.k_norm)
            for linear, weight, bias in (
                (mixer.q_proj, weights.q, weights.q_bias),
                (mixer.k_proj, weights.k, weights.k_bias),
                (mixer.v_proj, weights.v, weights.v_bias),
                (mixer.o_proj, weights.o, weights.o_bias),
            ):
                if (linear.bias is None) != (bias is None):
                    raise ValueError(
                        "the teacher's attention biases do not match the geometry's "
                        f"attention_bias={geometry.attention_bias}, output_bias={geometry.output_bias}"
                    )
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
        return mixer


class WindowAttention(AttentionMixer):
    """The teacher's softmax attention over the last W tokens only, with a constant-size decoding state.

    Query i sees keys j with i − j < W. The state is the last W − 1 keys (after RoPE) and values and a
    count of the tokens seen, {"k", "v": (B, W − 1, H_kv, d), "seen": (B,)}. ``from_attention`` copies the
    teacher's projections, so up to W tokens it computes exactly the teacher's attention. A teacher layer
    that already has a narrower window keeps it."""

    class Config(MixerConfig):
        window: int = Field(64, ge=1, description="W, tokens each token attends to, itself included")

    state_grows = False

    def __init__(self, geometry: AttentionGeometry, config: MixerConfig | None = None):
        config = config if config is not None else self.Config()
        window = min(config.window, geometry.sliding_window or config.window)
        super().__init__(replace(geometry, sliding_window=window), config)
        self.window = window

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (B, Tq, H, d), k and v (B, Tk, H_kv, d), allowed (B, 1, Tq, Tk) → (B, Tq, H, d)."""
        g = self.geometry
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        if g.logit_softcap is None:
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=g.scale
            )
            return y.transpose(1, 2)
        scores = torch.tanh(torch.einsum("bqhd,bkhd->bhqk", q, k) * g.scale / g.logit_softcap) * g.logit_softcap
        probabilities = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32)
        return torch.einsum("bhqk,bkhd->bqhd", probabilities.to(q.dtype), v)

    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and the state; the tokens also attend to the state's W − 1 keys."""
        batch, length, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, rotary)
        state = state if state is not None else self.init_state(batch, q.device, q.dtype)
        keys, values = torch.cat((state["k"], k), dim=1), torch.cat((state["v"], v), dim=1)  # (B, W−1+T, H_kv, d)
        kept = self.window - 1
        # Slot s < W − 1 holds the token W − 1 − s places before this call's first one: empty until seen.
        filled = torch.arange(kept, device=q.device)[None, :] >= kept - state["seen"][:, None]  # (B, W−1)
        filled = torch.cat((filled, filled.new_ones(batch, length)), dim=1)  # (B, W−1+T)
        allowed = causal_mask(length, kept + length, q.device, self.window) & filled[:, None, None, :]
        y = self._attend(q, keys, values, allowed)
        new_state = {"k": keys[:, length:], "v": values[:, length:], "seen": state["seen"] + length}
        return self.o_proj(y.reshape(batch, length, -1)), new_state

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """No tokens seen: k and v (B, W − 1, H_kv, d) zeros, seen (B,) 0."""
        g, reference = self.geometry, self.k_proj.weight
        device, dtype = device or reference.device, dtype or reference.dtype
        empty = torch.zeros(batch_size, self.window - 1, g.num_kv_heads, g.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "seen": torch.zeros(batch_size, dtype=torch.long, device=device)}


@hookimpl
def register_mixers(register):
    register("attention", AttentionMixer)
    register("window_attention", WindowAttention)
