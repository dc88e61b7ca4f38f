"""Toeplitz mixer: a learned relative-position (linear time-invariant) mixing matrix per head.

    M[h, i, j] = w[h, i − j]  for 0 ≤ i − j < K,  0 otherwise        y = M v,  output o_proj(y)

K = ``max_len`` is the longest offset with a weight; M does not depend on the input, so this is the family
of long causal convolutions. The fast path is an FFT convolution (O(T log T)); the recurrent state is the
last K − 1 values, (B, K − 1, H, d): constant in the sequence length, linear in K.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import (
    AttentionGeometry,
    AttentionWeights,
    MixerConfig,
    RotaryEmbedding,
    SequenceMixer,
    State,
    copy_projection,
)


class Toeplitz(SequenceMixer):
    """y_t = Σ_{k<K} w[k] v_{t−k} per head, with v and the output projection from the teacher."""

    class Config(MixerConfig):
        max_len: int = Field(512, ge=1, description="K, number of learned offsets 0 … K−1 (longer ones weigh 0)")
        a_init: float = Field(
            0.9, gt=0.0, lt=1.0, description="initial weights w[k] = (1 − a)·a^k: an exponential moving average"
        )

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        super().__init__(geometry, config)
        config = self.config
        g = geometry
        self.groups = g.query_groups
        self.v_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        self.o_proj = nn.Linear(g.num_heads * g.head_dim, g.hidden_size, bias=g.output_bias)
        a = config.a_init
        offsets = torch.arange(config.max_len, dtype=torch.float32)
        self.weights = nn.Parameter(((1 - a) * a**offsets).expand(g.num_heads, -1).clone())  # (H, K)

    def _values(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(…, D) → v (…, H, d), kv heads repeated for grouped-query geometry."""
        g = self.geometry
        v = self.v_proj(hidden_states).view(*hidden_states.shape[:-1], g.num_kv_heads, g.head_dim)
        return v.repeat_interleave(self.groups, dim=-2)

    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and {"values": the last K − 1 values}; FFT convolution, ``rotary`` unused."""
        batch, length, _ = hidden_states.shape
        v = self._values(hidden_states)  # (B, T, H, d)
        past = state["values"] if state is not None else self.init_state(batch, v.device, v.dtype)["values"]
        seen = torch.cat([past, v], dim=1)  # (B, K − 1 + T, H, d)
        size = seen.shape[1] + self.config.max_len  # long enough that the circular convolution does not wrap
        spectrum = torch.fft.rfft(seen, n=size, dim=1) * torch.fft.rfft(self.weights, n=size, dim=1).T[..., None]
        y = torch.fft.irfft(spectrum, n=size, dim=1)[:, seen.shape[1] - length : seen.shape[1]]  # (B, T, H, d)
        keep = self.config.max_len - 1
        return self.o_proj(y.flatten(-2)), {"values": seen[:, seen.shape[1] - keep :]}

    def mixing_matrix(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → M (B, H, T, T) with M[h, i, j] = w[h, i − j]; the same for every input."""
        batch, length, _ = hidden_states.shape
        offset = torch.arange(length, device=hidden_states.device)
        offset = offset[:, None] - offset[None, :]  # (T, T): i − j
        inside = (offset >= 0) & (offset < self.config.max_len)
        M = self.weights[:, offset.clamp(0, self.config.max_len - 1)] * inside  # (H, T, T)
        return M.expand(batch, -1, -1, -1)

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → o_proj(M @ v)."""
        y = self.mixing_matrix(hidden_states) @ self._values(hidden_states).transpose(1, 2)  # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).flatten(-2))

    def matrix_parameters(self) -> list[nn.Parameter]:
        """Only the weights w shape M."""
        return [self.weights]

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """{"values": (B, K − 1, H, d)} zeros."""
        g = self.geometry
        return self.zero_state(
            {"values": (batch_size, self.config.max_len - 1, g.num_heads, g.head_dim)}, device, dtype
        )

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token (B, D) → (B, D): y = Σ_k w[k] v_{t−k} over the stored window."""
        window = torch.cat([state["values"], self._values(hidden_state).unsqueeze(1)], dim=1)  # (B, K, H, d)
        y = torch.einsum("bkhd,hk->bhd", window, self.weights.flip(-1))  # the newest value meets w[0]
        return self.o_proj(y.flatten(-2)), {"values": window[:, 1:]}

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: MixerConfig | None = None
    ) -> Toeplitz:
        """v and o (with biases) from the teacher; w starts as the moving average of ``a_init``."""
        mixer = cls(geometry, config)
        for linear, weight, bias in (
            (mixer.v_proj, weights.v, weights.v_bias),
            (mixer.o_proj, weights.o, weights.o_bias),
        ):
            copy_projection(linear, weight, bias)
        return mixer


@hookimpl
def register_mixers(register):
    register("toeplitz", Toeplitz)
