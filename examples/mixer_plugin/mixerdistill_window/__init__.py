"""Sliding-window softmax attention: each token attends to itself and the W − 1 tokens before it.

    M[i, j] = softmax_j(q_i · k_j / √d)  over  i − W < j ≤ i,   0 elsewhere        y = o_proj(M v)

The fast path gathers each token's window of keys and values (O(T · W) time and memory); the recurrent
state is the last W − 1 keys and values, (B, W − 1, H, d): constant in the sequence length. q, k, v and
o come from the teacher and q, k get its rotary embedding, so at W ≥ T the mixer is the teacher's attention.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import (AttentionGeometry, AttentionWeights, MixerConfig, RotaryEmbedding, SequenceMixer,
                                State, copy_projection, repeat_kv_rows)


def rotate(x: torch.Tensor, rotary: RotaryEmbedding, rotary_dim: int) -> torch.Tensor:
    """x (B, T, H, d) with the rotary embedding applied to its first ``rotary_dim`` dims; (cos, sin) are each
    (B, T, rotary_dim). transformers' convention: x·cos + rotate_half(x)·sin, rotate_half(a‖b) = (−b)‖a."""
    if rotary is None or rotary_dim == 0:
        return x
    cos, sin = (t.unsqueeze(2) for t in rotary)  # (B, T, 1, rotary_dim): the same for every head
    rotated, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    return torch.cat([rotated * cos + torch.cat([-second, first], dim=-1) * sin, rest], dim=-1)


class SlidingWindowAttention(SequenceMixer):
    """Causal softmax attention restricted to the last ``window`` tokens."""

    class Config(MixerConfig):
        window: int = Field(64, ge=1, description="W, tokens each token sees, itself included")

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        config = config if config is not None else self.Config()
        super().__init__(geometry, config)
        g = geometry
        width = g.num_heads * g.head_dim
        self.q_proj = nn.Linear(g.hidden_size, width, bias=g.attention_bias)
        self.k_proj = nn.Linear(g.hidden_size, width, bias=g.attention_bias)
        self.v_proj = nn.Linear(g.hidden_size, width, bias=g.attention_bias)
        self.o_proj = nn.Linear(width, g.hidden_size, bias=g.output_bias)

    def _qkv(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding):
        """(B, T, D) → q, k, v (B, T, H, d); q and k rotated."""
        shape = (*hidden_states.shape[:-1], self.geometry.num_heads, self.geometry.head_dim)
        q, k, v = (proj(hidden_states).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return rotate(q, rotary, self.geometry.rotary_dim), rotate(k, rotary, self.geometry.rotary_dim), v

    def mixing_matrix(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → M (B, H, T, T): the windowed softmax, zero outside the window."""
        q, k, _ = self._qkv(hidden_states, rotary)
        length = q.shape[1]
        offset = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # i − j
        inside = ((offset >= 0) & (offset < self.config.window)).to(q.device)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * self.geometry.scale
        return torch.softmax(scores.masked_fill(~inside, float("-inf")), dim=-1)

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → o_proj(M @ v), M from ``mixing_matrix``."""
        _, _, v = self._qkv(hidden_states, rotary)
        y = torch.einsum("bhij,bjhd->bihd", self.mixing_matrix(hidden_states, rotary), v)
        return self.o_proj(y.flatten(-2))

    def matrix_parameters(self) -> list[nn.Parameter]:
        """q and k shape M."""
        return [*self.q_proj.parameters(), *self.k_proj.parameters()]

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """q (B, T, H, d), keys/values (B, T, W, H, d), valid (B, T, W) → (B, T, H, d)."""
        scores = torch.einsum("bthd,btwhd->bthw", q, keys) * self.geometry.scale
        scores = scores.masked_fill(~valid.unsqueeze(-2), float("-inf"))
        return torch.einsum("bthw,btwhd->bthd", torch.softmax(scores, dim=-1), values)

    def forward(self, hidden_states: torch.Tensor, state: State | None = None,
                rotary: RotaryEmbedding = None) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and {"k", "v", "seen"}: the last W − 1 keys and values."""
        batch, length, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, rotary)
        state = state if state is not None else self.init_state(batch, q.device, q.dtype)
        keys, values = torch.cat([state["k"], k], dim=1), torch.cat([state["v"], v], dim=1)  # (B, W−1+T, H, d)
        windows = [t.unfold(1, self.config.window, 1).permute(0, 1, 4, 2, 3) for t in (keys, values)]  # (B,T,W,H,d)
        # Window slot w of token t holds position t − (W − 1) + w; slots before the first token are empty.
        position = state["seen"][:, None, None] + torch.arange(length, device=q.device)[None, :, None] \
            - (self.config.window - 1) + torch.arange(self.config.window, device=q.device)[None, None, :]
        y = self._attend(q, *windows, position >= 0)
        keep = self.config.window - 1
        new_state = {"k": keys[:, keys.shape[1] - keep:], "v": values[:, values.shape[1] - keep:],
                     "seen": state["seen"] + length}
        return self.o_proj(y.flatten(-2)), new_state

    def init_state(self, batch_size: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> State:
        """{"k", "v": (B, W − 1, H, d) zeros, "seen": (B,) tokens seen so far}."""
        g, reference = self.geometry, self.q_proj.weight
        device, dtype = device or reference.device, dtype or reference.dtype
        empty = torch.zeros(batch_size, self.config.window - 1, g.num_heads, g.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "seen": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, hidden_state: torch.Tensor, state: State,
             rotary: RotaryEmbedding = None) -> tuple[torch.Tensor, State]:
        """One token (B, D), rotary (cos, sin) each (B, rotary_dim) → (B, D): forward on a length-1 sequence."""
        rotary = None if rotary is None else tuple(t.unsqueeze(1) for t in rotary)
        output, state = self(hidden_state.unsqueeze(1), state=state, rotary=rotary)
        return output.squeeze(1), state

    @classmethod
    def from_attention(cls, weights: AttentionWeights, geometry: AttentionGeometry,
                       config: Config | None = None) -> "SlidingWindowAttention":
        """q, k, v, o and their biases from the teacher (k and v repeated over grouped-query heads)."""
        mixer = cls(geometry, config)
        copy_projection(mixer.q_proj, weights.q, weights.q_bias)
        for linear, weight, bias in ((mixer.k_proj, weights.k, weights.k_bias), (mixer.v_proj, weights.v, weights.v_bias)):
            copy_projection(linear, repeat_kv_rows(geometry, weight), None if bias is None else repeat_kv_rows(geometry, bias))
        copy_projection(mixer.o_proj, weights.o, weights.o_bias)
        return mixer


@hookimpl
def register_mixers(register):
    register("sliding_window", SlidingWindowAttention)
