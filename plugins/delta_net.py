"""Delta-rule students: Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024) and DeltaNet (Yang et al. 2024).

The layer, as published: q, k, v projections (H heads of the teacher's head_dim), a short causal depthwise
conv over q‖k‖v, L2-normalised q and k, a write strength β_t = sigmoid(w_β·u_t + b_β) per head, and for
Gated DeltaNet a decay α_t = exp(−e^{A_log} softplus(w_α·u_t + dt_bias)) per head. Per head:

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ        y_t = S_tᵀ (s_h q_t)

then a per-head RMS norm of y, an output gate silu(g_proj u) (Gated DeltaNet) and o_proj. The query
scale s_h is learnable per head (starting at 1/√head_dim, the published fixed scale): the output norm makes
it invisible to the layer's output, but it sets the magnitude of the mixing matrix M (o = M v,
``mixerdistill.ops.delta``) that stage 1 compares with attention. DeltaNet is the case α = 1.

``QKVMixer`` is the part shared with ``mlstm``: projections, conv, output norm and gate, weight transfer.
"""

from __future__ import annotations

import math
from typing import Literal

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
    RotaryEmbedding,
    SequenceMixer,
    State,
    copy_projection,
    repeat_kv_rows,
)
from mixerdistill.ops.conv import causal_conv1d, causal_conv1d_step
from mixerdistill.ops.delta import delta_rule, delta_rule_matrix_rows, delta_rule_step
from mixerdistill.ops.kernels import KERNEL_HELP, KernelChoice


class QKVMixer(SequenceMixer):
    """A recurrent mixer fed by attention-shaped q, k, v (H heads of width d): the shared layer around a cell.

    Subclasses set ``normalise_qk`` and implement the cell: ``_gates`` (per-token
    gates from the input), ``_cell`` (chunked), ``_cell_step`` (one token), ``_cell_rows`` (mixing matrix
    rows) and ``_cell_state`` (zeros).
    """

    normalise_qk = True  # L2-normalise q and k per head (before the query scale)

    class Config(MixerConfig):
        d_conv: int = Field(
            4,
            ge=1,
            description="kernel size of the causal depthwise conv over q‖k‖v "
            "(starts as the identity; 1: no mixing across tokens)",
        )
        conv_activation: Literal["silu", "identity"] = Field(
            "silu",
            description="activation after the conv (silu as published; identity keeps the transferred "
            "q, k, v exactly as the teacher's)",
        )
        output_norm: bool = Field(True, description="per-head RMS norm of the cell's output before the gate")
        output_gate: bool = Field(True, description="multiply by silu(g_proj(u)) before o_proj")
        gate_bias_init: float = Field(
            1.2785, description="initial g_proj bias, weight 0 (silu(1.2785) ≈ 1: the gate starts open)"
        )
        chunk_size: int = Field(64, ge=1, description="Q, tokens per chunk of the chunked path")
        kernel: KernelChoice = Field("auto", description=KERNEL_HELP)

    def __init__(self, geometry: AttentionGeometry, config: MixerConfig | None = None):
        config = config if config is not None else self.Config()
        super().__init__(geometry, config)
        g = geometry
        self.num_heads, self.head_dim = H, d = g.num_heads, g.head_dim
        self.q_proj = nn.Linear(g.hidden_size, H * d, bias=g.attention_bias)
        self.k_proj = nn.Linear(g.hidden_size, H * d, bias=g.attention_bias)
        self.v_proj = nn.Linear(g.hidden_size, H * d, bias=g.attention_bias)
        self.conv1d = nn.Conv1d(3 * H * d, 3 * H * d, config.d_conv, groups=3 * H * d, padding=config.d_conv - 1)
        self.log_q_scale = nn.Parameter(torch.full((H,), math.log(g.scale)))
        self.o_norm = nn.Parameter(torch.ones(H, d)) if config.output_norm else None
        self.g_proj = nn.Linear(g.hidden_size, H * d) if config.output_gate else None
        self.o_proj = nn.Linear(H * d, g.hidden_size, bias=g.output_bias)
        with torch.no_grad():
            self.conv1d.weight.zero_()
            self.conv1d.weight[:, 0, -1] = 1.0
            self.conv1d.bias.zero_()
            if self.g_proj is not None:
                self.g_proj.weight.zero_()
                self.g_proj.bias.fill_(config.gate_bias_init)

    # -- the cell, per subclass ----------------------------------------------------------------
    def _gates(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(…, D) → per-token gates, each (…, H)."""
        raise NotImplementedError

    def _cell(self, q, k, v, gates, state: State | None) -> tuple[torch.Tensor, State]:
        """q, k (B, T, H, d), v (B, T, H, d), gates (B, T, H) → y (B, T, H, d), cell state after T."""
        raise NotImplementedError

    def _cell_step(self, q, k, v, gates, state: State) -> tuple[torch.Tensor, State]:
        """One token: q, k, v (B, H, d), gates (B, H) → y (B, H, d), next cell state."""
        raise NotImplementedError

    def _cell_rows(self, q, k, gates) -> MatrixRows:
        """q, k (B, T, H, d), gates (B, T, H) → row blocks of M."""
        raise NotImplementedError

    def _cell_state(self, batch_size: int, device, dtype) -> State:
        """The cell's zero state."""
        raise NotImplementedError

    # -- shared pieces -------------------------------------------------------------------------
    def _split_qkv(self, mixed: torch.Tensor):
        """(…, 3·H·d) after the conv → q (scaled), k, v, each (…, H, d)."""
        q, k, v = mixed.unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        if self.normalise_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q * self.log_q_scale.exp()[:, None].to(q.dtype), k, v

    def _qkv(self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None):
        """(B, T, D) → q, k, v (B, T, H, d) and the conv state (B, 3·H·d, d_conv − 1)."""
        projected = torch.cat(
            [self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1
        )
        mixed, conv_state = causal_conv1d(
            projected.transpose(1, 2),
            self.conv1d.weight,
            self.conv1d.bias,
            conv_state,
            activation=self.config.conv_activation,
            kernel=self.config.kernel,
        )
        return (*self._split_qkv(mixed.transpose(1, 2)), conv_state)

    def _output(self, y: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Cell output y (…, H, d) and the mixer input (…, D) → (…, D): norm, gate, o_proj."""
        if self.o_norm is not None:
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + 1e-6) * self.o_norm
        y = y.flatten(-2)
        if self.g_proj is not None:
            y = y * F.silu(self.g_proj(hidden_states))
        return self.o_proj(y)

    # -- SequenceMixer -------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and {"conv": …, cell state}; chunked, ``rotary`` unused."""
        q, k, v, conv_state = self._qkv(hidden_states, None if state is None else state["conv"])
        y, cell_state = self._cell(q, k, v, self._gates(hidden_states), state)
        return self._output(y, hidden_states), {"conv": conv_state, **cell_state}

    def mixing_matrix(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → M (B, H, T, T) with y = M v (y: the cell output before norm and gate)."""
        return self.matrix_rows(hidden_states, rotary)(0, hidden_states.shape[1])

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → row blocks of M, keeping per-token q, k and gates only (O(T) memory)."""
        q, k, _, _ = self._qkv(hidden_states)
        return self._cell_rows(q, k, self._gates(hidden_states))

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → the output computed as (M @ v), then norm, gate and o_proj."""
        _, _, v, _ = self._qkv(hidden_states)
        y = (self.mixing_matrix(hidden_states) @ v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, d)
        return self._output(y, hidden_states)

    def matrix_parameters(self) -> list[nn.Parameter]:
        """Everything but v_proj, the output norm, gate and o_proj: q, k, the conv (its q and k channels),
        the query scale and the cell's gates."""
        excluded = {
            id(p)
            for module in (self.v_proj, self.g_proj, self.o_proj)
            if module is not None
            for p in module.parameters()
        }
        excluded |= {id(self.o_norm)} if self.o_norm is not None else set()
        return [p for p in self.parameters() if id(p) not in excluded]

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """{"conv": (B, 3·H·d, d_conv − 1) pre-conv inputs, the cell's state}, all zeros."""
        device = device if device is not None else self.q_proj.weight.device
        dtype = dtype if dtype is not None else self.q_proj.weight.dtype
        conv = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.config.d_conv - 1, device=device, dtype=dtype)
        return {"conv": conv, **self._cell_state(batch_size, device, dtype)}

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token (B, D) and the state → (B, D) and the next state; ``rotary`` is unused."""
        projected = torch.cat([self.q_proj(hidden_state), self.k_proj(hidden_state), self.v_proj(hidden_state)], dim=-1)
        mixed, conv_state = causal_conv1d_step(
            projected, self.conv1d.weight, self.conv1d.bias, state["conv"], activation=self.config.conv_activation
        )
        q, k, v = self._split_qkv(mixed)
        y, cell_state = self._cell_step(q, k, v, self._gates(hidden_state), state)
        return self._output(y, hidden_state), {"conv": conv_state, **cell_state}

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: MixerConfig | None = None
    ) -> QKVMixer:
        """q, k, v, o (and biases) copied from the teacher layer, k/v heads repeated for grouped-query attention;
        conv, gates, norm and the query scale as initialised."""
        mixer = cls(geometry, config)
        for linear, weight, bias in (
            (mixer.q_proj, weights.q, weights.q_bias),
            (mixer.k_proj, repeat_kv_rows(geometry, weights.k), _repeat_bias(geometry, weights.k_bias)),
            (mixer.v_proj, repeat_kv_rows(geometry, weights.v), _repeat_bias(geometry, weights.v_bias)),
            (mixer.o_proj, weights.o, weights.o_bias),
        ):
            copy_projection(linear, weight, bias)
        return mixer


def _repeat_bias(geometry: AttentionGeometry, bias: torch.Tensor | None) -> torch.Tensor | None:
    """(H_kv·d,) → (H·d,), as ``repeat_kv_rows`` does for weights; None stays None."""
    return None if bias is None else repeat_kv_rows(geometry, bias[:, None])[:, 0]


class DeltaNet(QKVMixer):
    """DeltaNet: the delta rule without decay, α = 1 (``mixerdistill.ops.delta``); no output gate by default,
    as published."""

    gated = False  # Gated DeltaNet: a decay α_t per head and token

    class Config(QKVMixer.Config):
        beta_init: float = Field(0.5, gt=0.0, lt=1.0, description="initial write strength β (w_β starts at 0)")
        output_gate: bool = Field(False, description="multiply by silu(g_proj(u)) before o_proj")

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        config = config if config is not None else self.Config()
        super().__init__(geometry, config)
        H = self.num_heads
        self.b_proj = nn.Linear(geometry.hidden_size, H)
        with torch.no_grad():
            self.b_proj.weight.zero_()
            self.b_proj.bias.fill_(math.log(config.beta_init / (1 - config.beta_init)))
        if self.gated:
            self.a_proj = nn.Linear(geometry.hidden_size, H, bias=False)
            nn.init.zeros_(self.a_proj.weight)
            self.A_log = nn.Parameter(torch.zeros(H))
            self.dt_bias = nn.Parameter(torch.full((H,), math.log(math.expm1(-math.log(config.a_init)))))

    def _gates(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(…, D) → β (…, H) and, when gated, log α = −e^{A_log} softplus(w_α·u + dt_bias) (…, H)."""
        beta = torch.sigmoid(self.b_proj(hidden_states))
        if not self.gated:
            return (beta,)
        return beta, -self.A_log.exp() * F.softplus(self.a_proj(hidden_states) + self.dt_bias)

    @staticmethod
    def _log_a(gates: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        return gates[1] if len(gates) > 1 else None

    def _cell(self, q, k, v, gates, state):
        y, final = delta_rule(
            q,
            k,
            v,
            gates[0],
            self._log_a(gates),
            self.config.chunk_size,
            None if state is None else state["delta"],
            kernel=self.config.kernel,
        )
        return y, {"delta": final}

    def _cell_step(self, q, k, v, gates, state):
        y, new = delta_rule_step(q, k, v, gates[0], self._log_a(gates), state["delta"])
        return y, {"delta": new}

    def _cell_rows(self, q, k, gates):
        return delta_rule_matrix_rows(q, k, gates[0], self._log_a(gates), self.config.chunk_size)

    def _cell_state(self, batch_size, device, dtype):
        """{"delta": (B, H, d, d)} zeros."""
        return {
            "delta": torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, device=device, dtype=dtype)
        }


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: the delta rule with a per-head, per-token decay α_t."""

    gated = True

    class Config(DeltaNet.Config):
        output_gate: bool = Field(True, description="multiply by silu(g_proj(u)) before o_proj")
        a_init: float = Field(0.9, gt=0.0, lt=1.0, description="initial decay α (w_α and A_log start at 0)")


@hookimpl
def register_mixers(register):
    register("gated_delta_net", GatedDeltaNet)
    register("delta_net", DeltaNet)
