"""Mamba-2 (Dao & Gu, 2024) as a student mixer: the standard architecture, so a teacher can be distilled
into a model that Mamba-2 tooling understands.

Per token, one ``in_proj`` gives z (H·P), x (H·P), B and C (G groups × N, shared by H/G heads each) and dt
(H). A causal depthwise conv1d with SiLU runs over x‖B‖C. Then, per head,

    dt_t = softplus(dt_t + dt_bias)    A = −exp(A_log)    a_t = exp(dt_t · A)
    S_t = a_t S_{t−1} + dt_t B_t x_tᵀ   y_t = C_tᵀ S_t + D x_t

and the output is ``out_proj(RMSNorm(y ⊙ silu(z)))``, normalised per group of H·P/G channels (Mamba-2's
gated RMSNorm with norm_before_gate=False). The mixing matrix is M = L ∘ (C (dt ⊙ B)ᵀ) applied to x;
the normalisation sits after M, so the pre-projection output is norm((M x + D x) ⊙ silu(z)).
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
    repeat_kv_rows,
)
from mixerdistill.ops.conv import causal_conv1d, causal_conv1d_step
from mixerdistill.ops.kernels import KERNEL_HELP, KernelChoice
from mixerdistill.ops.ssd import ssd, ssd_matrix_rows, ssd_step


class Mamba2(SequenceMixer):
    """Mamba-2 with shared B/C groups, SiLU conv, dt/A/D parameters and a gated RMSNorm before out_proj."""

    class Config(MixerConfig):
        d_state: int | None = Field(None, ge=1, description="N, state size (None: the teacher's head_dim)")
        head_dim: int | None = Field(None, ge=1, description="P, width of x per head (None: the teacher's head_dim)")
        num_heads: int | None = Field(None, ge=1, description="H (None: the teacher's num_heads)")
        n_groups: int | None = Field(
            None,
            ge=1,
            description="G, groups sharing B and C (None: one per head, which "
            "from_attention needs; Mamba-2 models often use 1)",
        )
        d_conv: int = Field(4, ge=1, description="kernel size of the causal depthwise conv over x‖B‖C")
        chunk_size: int = Field(
            64,
            ge=1,
            description="Q, tokens per chunk of the chunked SSD (64: fastest on CPU, see "
            "docs/performance.md; the CUDA kernels favour 256)",
        )
        conv_init: Literal["identity", "random"] = Field(
            "identity",
            description="identity: kernel [0, …, 0, 1], bias 0 (keeps transferred B, C close to k, q); "
            "random: nn.Conv1d's default, as Mamba-2 trained from scratch",
        )
        A_init_range: tuple[float, float] = Field((1.0, 16.0), description="A = −exp(A_log) drawn from −U(lo, hi)")
        dt_min: float = Field(0.001, gt=0.0, description="smallest initial dt (log-uniform)")
        dt_max: float = Field(0.1, gt=0.0, description="largest initial dt (log-uniform)")
        D_init: float = Field(1.0, description="initial skip D, per head")
        norm_eps: float = Field(1e-5, gt=0.0, description="RMSNorm epsilon")
        a_init: float = Field(0.9, gt=0.0, lt=1.0, description="from_attention: dt ≈ 1 and a = exp(A) = a_init")
        kernel: KernelChoice = Field("auto", description=KERNEL_HELP)

        @model_validator(mode="after")
        def _ranges(self):
            if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
                raise ValueError("A_init_range must be (lo, hi) with 0 < lo ≤ hi")
            if self.dt_min > self.dt_max:
                raise ValueError("dt_min must not exceed dt_max")
            return self

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        super().__init__(geometry, config)
        config = self.config
        self.num_heads = H = config.num_heads or geometry.num_heads
        self.head_dim = P = config.head_dim or geometry.head_dim
        self.d_state = N = config.d_state or geometry.head_dim
        self.n_groups = G = config.n_groups or H
        if H % G:
            raise ValueError(f"num_heads {H} is not a multiple of n_groups {G}")
        self.d_conv = config.d_conv
        self.conv_dim = H * P + 2 * G * N  # channels of x‖B‖C

        self.in_proj = nn.Linear(geometry.hidden_size, 2 * H * P + 2 * G * N + H, bias=False)  # → z, x, B, C, dt
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1, bias=True
        )
        lo, hi = config.A_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))
        dt = torch.exp(torch.empty(H).uniform_(math.log(config.dt_min), math.log(config.dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.D = nn.Parameter(torch.full((H,), config.D_init))
        self.norm_weight = nn.Parameter(torch.ones(H * P))
        self.out_proj = nn.Linear(H * P, geometry.hidden_size, bias=geometry.output_bias)
        if config.conv_init == "identity":
            with torch.no_grad():
                self.conv1d.weight.zero_()
                self.conv1d.weight[:, 0, -1] = 1.0
                self.conv1d.bias.zero_()

    def _rows(self, name: str) -> torch.Tensor:
        """The rows of ``in_proj.weight`` that produce ``name`` (z, x, B, C or dt), as a view."""
        H, P, N, G = self.num_heads, self.head_dim, self.d_state, self.n_groups
        rows = self.in_proj.weight.split([H * P, H * P, G * N, G * N, H])
        return dict(zip(("z", "x", "B", "C", "dt"), rows))[name]

    # -- shared pieces -------------------------------------------------------------------------
    def _heads(self, z, xBC, dt):
        """Post-conv x‖B‖C (…, conv_dim), z (…, H·P), raw dt (…, H) → x (…, H, P), dt·B and C (…, H, N),
        log_a (…, H), z."""
        H, P, N, G = self.num_heads, self.head_dim, self.d_state, self.n_groups
        x, B, C = xBC.split([H * P, G * N, G * N], dim=-1)
        B, C = (t.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=-2) for t in (B, C))  # group g → heads
        dt = F.softplus(dt + self.dt_bias)  # (…, H)
        log_a = -dt * torch.exp(self.A_log)  # dt · A
        return x.unflatten(-1, (H, P)), B * dt.unsqueeze(-1), C, log_a, z

    def _project(self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None):
        """(B, T, D) → x, dt·B, C, log_a, z (see ``_heads``) and the new conv state (B, conv_dim, d_conv−1)."""
        z, xBC, dt = self.in_proj(hidden_states).split(
            [self.num_heads * self.head_dim, self.conv_dim, self.num_heads], dim=-1
        )
        xBC, new_conv_state = causal_conv1d(
            xBC.transpose(1, 2),
            self.conv1d.weight,
            self.conv1d.bias,
            conv_state,
            activation="silu",
            kernel=self.config.kernel,
        )
        return (*self._heads(z, xBC.transpose(1, 2), dt), new_conv_state)

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SSD output y and x (…, H, P), z (…, H·P) → out_proj(RMSNorm_groups((y + D x) ⊙ silu(z)))."""
        y = ((y + self.D[:, None] * x).flatten(-2) * F.silu(z)).unflatten(-1, (self.n_groups, -1))
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.config.norm_eps)
        return self.out_proj(y.flatten(-2) * self.norm_weight)

    # -- SequenceMixer -------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and {"conv", "ssm"}; chunked SSD, ``rotary`` unused."""
        x, B, C, log_a, z, conv_state = self._project(hidden_states, None if state is None else state["conv"])
        y, ssm_state = ssd(
            x, log_a, B, C, self.config.chunk_size, None if state is None else state["ssm"], kernel=self.config.kernel
        )
        return self._output(y, x, z), {"conv": conv_state, "ssm": ssm_state}

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → row blocks of M (B, H, T, T) = L ∘ (C (dt ⊙ B)ᵀ), keeping only dt·B, C and the decays
        (O(T) memory); the pre-norm output is M @ x + D x."""
        _, B, C, log_a, _, _ = self._project(hidden_states)
        return ssd_matrix_rows(log_a, B, C)

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → out_proj(norm((M @ x + D x) ⊙ silu(z)))."""
        x, _, _, _, z, _ = self._project(hidden_states)
        y = (self.mixing_matrix(hidden_states, rotary) @ x.transpose(1, 2)).transpose(1, 2)
        return self._output(y, x, z)

    def matrix_parameters(self) -> list[nn.Parameter]:
        """in_proj (its B, C and dt rows get the gradient), conv, dt_bias and A_log."""
        return [self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log]

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """{"conv": (B, conv_dim, d_conv−1), "ssm": (B, H, N, P)} zeros."""
        return self.zero_state(
            {
                "conv": (batch_size, self.conv_dim, self.d_conv - 1),
                "ssm": (batch_size, self.num_heads, self.d_state, self.head_dim),
            },
            device,
            dtype,
        )

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token (B, D) → (B, D) and the next state."""
        z, xBC, dt = self.in_proj(hidden_state).split(
            [self.num_heads * self.head_dim, self.conv_dim, self.num_heads], dim=-1
        )
        xBC, conv_state = causal_conv1d_step(xBC, self.conv1d.weight, self.conv1d.bias, state["conv"], "silu")
        x, B, C, log_a, z = self._heads(z, xBC, dt)
        y, ssm_state = ssd_step(x, log_a, B, C, state["ssm"])
        return self._output(y, x, z), {"conv": conv_state, "ssm": ssm_state}

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: Config | None = None
    ) -> Mamba2:
        """C ← q · scale, B ← k (kv heads repeated), x ← v, out_proj ← o; dt ≈ 1 and a = ``a_init``.

        Then M = L ∘ (C Bᵀ) starts as the teacher's scaled q·k scores under an exponential decay, as for
        discrete Mamba-2 (a teacher's q/k norm contributes its elementwise gain, ``fold_qk_norm``).
        z rows keep their random initialisation (Mamba-2 has no gate bias, and z = 0
        would silence the layer). Needs N = P = head_dim, H = num_heads and one group per head.
        """
        weights = fold_qk_norm(weights, geometry)
        mixer = cls(geometry, config)
        d = geometry.head_dim
        mixer.require_teacher_shapes(
            d_state=(mixer.d_state, d),
            head_dim=(mixer.head_dim, d),
            num_heads=(mixer.num_heads, geometry.num_heads),
            n_groups=(mixer.n_groups, geometry.num_heads),
        )
        with torch.no_grad():
            mixer._rows("x").copy_(repeat_kv_rows(geometry, weights.v))
            mixer._rows("B").copy_(repeat_kv_rows(geometry, weights.k))
            mixer._rows("C").copy_(weights.q * geometry.scale)
            mixer._rows("dt").zero_()
            mixer.dt_bias.fill_(math.log(math.e - 1))  # softplus⁻¹(1)
            mixer.A_log.fill_(math.log(-math.log(mixer.config.a_init)))
        copy_projection(mixer.out_proj, weights.o, weights.o_bias)
        return mixer


@hookimpl
def register_mixers(register):
    register("mamba2", Mamba2)
