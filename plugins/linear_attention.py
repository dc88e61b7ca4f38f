"""Linear attention and gated linear attention: causal low-rank mixers M = L ∘ (φ(Q) φ(K)ᵀ).

Per head, with feature map φ (width N), values v (P) and a decay a_t (1 for plain linear attention):

    S_t = a_t S_{t−1} + φ(k_t) v_tᵀ        y_t = φ(q_t)ᵀ S_t        (optionally / φ(q_t)ᵀ z_t)

which is SSD with C = φ(q), B = φ(k), x = v (``mixerdistill.ops.ssd``). Row normalisation divides each row
of M by its sum; it is computed by appending a column of ones to v, so the normaliser z_t rides along in
the state as its last column (state (B, H, N, P + 1)). Feature maps:

  identity   φ(x) = x                                           N = d
  elu        φ(x) = elu(x) + 1                                  N = d   (Katharopoulos et al., 2020)
  hedgehog   φ(x) = [softmax(W x), softmax(−W x)], W (d × d)    N = 2d  (Zhang et al., 2024), learnable,
             one W per head for queries and one for keys, initialised to the identity

Queries are scaled by the teacher's 1/√d before φ, so the identity map reproduces attention's logits.
Position enters only through causality (and the decay): the teacher's rotary embedding is not used.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import (
    AttentionGeometry,
    AttentionWeights,
    MatrixRows,
    MixerConfig,
    RotaryEmbedding,
    SequenceMixer,
    State,
    copy_projection,
    fold_qk_norm,
)
from mixerdistill.ops.kernels import KERNEL_HELP, KernelChoice
from mixerdistill.ops.ssd import ssd, ssd_matrix_rows, ssd_step


class LinearAttention(SequenceMixer):
    """Causal linear attention M = tril(φ(Q) φ(K)ᵀ), optionally row-normalised."""

    class Config(MixerConfig):
        feature_map: Literal["identity", "elu", "hedgehog"] = Field(
            "elu", description="φ: identity, elu (elu + 1) or hedgehog (learnable softmax map, N = 2·head_dim)"
        )
        normalize: bool = Field(True, description="divide each row of M by its sum (needs a positive φ)")
        chunk_size: int = Field(64, ge=1, description="Q, tokens per chunk of the chunked path")
        eps: float = Field(1e-6, gt=0.0, description="added to the row sums when normalising")
        kernel: KernelChoice = Field("auto", description=KERNEL_HELP)

        @model_validator(mode="after")
        def _positive_map_for_normalisation(self):
            if self.normalize and self.feature_map == "identity":
                raise ValueError(
                    "normalize: true needs a positive feature map (elu or hedgehog); "
                    "the identity map's row sums can be zero or negative"
                )
            return self

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        super().__init__(geometry, config)
        config = self.config
        g = geometry
        self.groups = g.query_groups
        self.feature_dim = 2 * g.head_dim if config.feature_map == "hedgehog" else g.head_dim  # N
        self.q_proj = nn.Linear(g.hidden_size, g.num_heads * g.head_dim, bias=g.attention_bias)
        self.k_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        self.v_proj = nn.Linear(g.hidden_size, g.num_kv_heads * g.head_dim, bias=g.attention_bias)
        self.o_proj = nn.Linear(g.num_heads * g.head_dim, g.hidden_size, bias=g.output_bias)
        if config.feature_map == "hedgehog":
            eye = torch.eye(g.head_dim).expand(g.num_heads, -1, -1)
            self.q_map = nn.Parameter(eye.clone())  # (H, d, d)
            self.k_map = nn.Parameter(eye.clone())

    # -- pieces shared by the three paths --------------------------------------------------------
    def _phi(self, t: torch.Tensor, which: str) -> torch.Tensor:
        """(…, H, d) → (…, H, N)."""
        kind = self.config.feature_map
        if kind == "identity":
            return t
        if kind == "elu":
            return F.elu(t) + 1
        projected = torch.einsum("...hd,hed->...he", t, self.q_map if which == "q" else self.k_map)
        return torch.cat([torch.softmax(projected, dim=-1), torch.softmax(-projected, dim=-1)], dim=-1)

    def _log_a(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(…, D) → log decay (…, H) or (…, H, N); 0 for plain linear attention."""
        return hidden_states.new_zeros(*hidden_states.shape[:-1], self.geometry.num_heads)

    def _inputs(self, hidden_states: torch.Tensor):
        """(…, D) → x (…, H, P[+1]), log_a, B = φ(k) and C = φ(q·scale) (…, H, N)."""
        g = self.geometry
        lead = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*lead, g.num_heads, g.head_dim) * g.scale
        k = self.k_proj(hidden_states).view(*lead, g.num_kv_heads, g.head_dim)
        v = self.v_proj(hidden_states).view(*lead, g.num_kv_heads, g.head_dim)
        k, v = (t.repeat_interleave(self.groups, dim=-2) for t in (k, v))  # kv head h // groups serves head h
        if self.config.normalize:
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # the last column carries the row sums
        return v, self._log_a(hidden_states), self._phi(k, "k"), self._phi(q, "q")

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        """(…, H, P[+1]) → (…, D): row-normalise by the ones column if asked, then o_proj."""
        if self.config.normalize:
            y = y[..., :-1] / (y[..., -1:] + self.config.eps)
        return self.o_proj(y.flatten(-2))

    # -- SequenceMixer -------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and {"ssm": (B, H, N, P[+1])}; chunked, ``rotary`` unused."""
        x, log_a, B, C = self._inputs(hidden_states)
        y, final = ssd(
            x,
            log_a,
            B,
            C,
            self.config.chunk_size,
            None if state is None else state["ssm"],
            kernel=self.config.kernel,
            library="fla",
        )
        return self._output(y), {"ssm": final}

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → row blocks of M (B, H, T, T) = L ∘ (φ(Q) φ(K)ᵀ), rows divided by their sums when
        normalising, from φ(Q), φ(K) and the decays (O(T) memory); a causal row block holds every nonzero
        entry of its rows, so normalising it normalises the full rows."""
        _, log_a, B, C = self._inputs(hidden_states)
        ssd_rows = ssd_matrix_rows(log_a, B, C, self.config.chunk_size)

        def rows(start: int, stop: int) -> torch.Tensor:
            M = ssd_rows(start, stop)
            return M / (M.sum(-1, keepdim=True) + self.config.eps) if self.config.normalize else M

        return rows

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → o_proj(M @ v)."""
        x, _, _, _ = self._inputs(hidden_states)
        v = x[..., :-1] if self.config.normalize else x
        y = (self.mixing_matrix(hidden_states) @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, P)
        return self.o_proj(y.flatten(-2))

    def matrix_parameters(self) -> list[nn.Parameter]:
        """Everything but v_proj and o_proj (and o_proj's bias): q, k, feature maps, decays."""
        excluded = {id(p) for p in (*self.v_proj.parameters(), *self.o_proj.parameters())}
        return [p for p in self.parameters() if id(p) not in excluded]

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """{"ssm": (B, H, N, P[+1])} zeros; with normalisation the last column is the normaliser z."""
        width = self.geometry.head_dim + int(self.config.normalize)
        return self.zero_state({"ssm": (batch_size, self.geometry.num_heads, self.feature_dim, width)}, device, dtype)

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token (B, D) → (B, D) and the next state."""
        x, log_a, B, C = self._inputs(hidden_state)
        y, ssm = ssd_step(x, log_a, B, C, state["ssm"])
        return self._output(y), {"ssm": ssm}

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: MixerConfig | None = None
    ) -> LinearAttention:
        """q, k, v, o (and their biases) copied from the teacher layer, a q/k norm's elementwise gain folded into q
        and k (``fold_qk_norm``); feature maps and decays as initialised."""
        weights = fold_qk_norm(weights, geometry)
        mixer = cls(geometry, config)
        for linear, weight, bias in (
            (mixer.q_proj, weights.q, weights.q_bias),
            (mixer.k_proj, weights.k, weights.k_bias),
            (mixer.v_proj, weights.v, weights.v_bias),
            (mixer.o_proj, weights.o, weights.o_bias),
        ):
            copy_projection(linear, weight, bias)
        return mixer


class GatedLinearAttention(LinearAttention):
    """Linear attention with a decay: M = L ∘ (φ(Q) φ(K)ᵀ), L from per-token gates.

    ``gate: head`` — one decay per head and token, a_t = exp(−softplus(g_t + bias)), g_t = w_g · u_t
    (``data_dependent: false`` drops g_t: a fixed learnable decay per head, the RetNet case).
    ``gate: key_dim`` — GLA-style, one decay per head and feature dimension (diagonal state transition).
    """

    class Config(LinearAttention.Config):
        gate: Literal["head", "key_dim"] = Field(
            "head", description="head: a scalar decay per head; key_dim: one per feature dimension (GLA)"
        )
        data_dependent: bool = Field(True, description="decays depend on the token (false: fixed, RetNet-like)")
        a_init: float = Field(0.9, gt=0.0, lt=1.0, description="initial decay (gate projection starts at 0)")

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        super().__init__(geometry, config)
        config = self.config
        H = geometry.num_heads
        width = H * self.feature_dim if config.gate == "key_dim" else H
        self.decay_bias = nn.Parameter(torch.full((width,), math.log(1 / config.a_init - 1)))  # softplus⁻¹(−log a)
        if config.data_dependent:
            self.g_proj = nn.Linear(geometry.hidden_size, width, bias=False)
            nn.init.zeros_(self.g_proj.weight)

    def _log_a(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.decay_bias.expand(*hidden_states.shape[:-1], -1)
        if self.config.data_dependent:
            gate = gate + self.g_proj(hidden_states)
        log_a = -F.softplus(gate)  # (…, H) or (…, H·N)
        return (
            log_a.unflatten(-1, (self.geometry.num_heads, self.feature_dim)) if self.config.gate == "key_dim" else log_a
        )


@hookimpl
def register_mixers(register):
    register("linear_attention", LinearAttention)
    register("gated_linear_attention", GatedLinearAttention)
