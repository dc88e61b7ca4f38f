"""The Phi-Mamba / Llamba mixer ("discrete Mamba-2"): SSD with one B and one C per head.

Per token, one ``in_proj`` gives x (H·P), B (H·N), C (H·N), gate z (H·P) and A_log (H). A causal depthwise
conv1d (kernel ``d_conv``, identity activation) runs over x‖B‖C. Decay a_t = exp(−softplus(A_log_t +
A_log_bias)). Per head: S_t = a_t S_{t−1} + B_t x_tᵀ (N × P), y_t = C_tᵀ S_t + D ⊙ x_t, and the output is
``out_proj(y ⊙ silu(z + z_bias))`` with no normalisation before ``out_proj``. The mixer uses no rotary
embedding: position enters only through causality and decay.
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
    fold_qk_norm,
    repeat_kv_rows,
)
from mixerdistill.ops.conv import causal_conv1d, causal_conv1d_step
from mixerdistill.ops.kernels import KERNEL_HELP, KernelChoice
from mixerdistill.ops.ssd import ssd, ssd_matrix_rows, ssd_step


class DiscreteMamba2(SequenceMixer):
    """Discrete Mamba-2 (Bick et al., 2024): M = L ∘ (C Bᵀ) per head, applied to x."""

    decay_per_state: bool = False  # True: one decay per (head, state dimension), as in ``semiseparable``

    class Config(MixerConfig):
        d_state: int | None = Field(None, ge=1, description="N, state size per head (None: the teacher's head_dim)")
        head_dim: int | None = Field(None, ge=1, description="P, width of x per head (None: the teacher's head_dim)")
        num_heads: int | None = Field(None, ge=1, description="H, number of heads (None: the teacher's num_heads)")
        d_conv: int = Field(4, ge=1, description="kernel size of the causal depthwise conv over x‖B‖C")
        chunk_size: int = Field(
            64,
            ge=1,
            description="Q, tokens per chunk of the chunked SSD (64: fastest on CPU, see "
            "docs/performance.md; the CUDA kernels favour 256)",
        )
        conv_init: Literal["identity", "random"] = Field(
            "identity", description="identity: kernel [0, …, 0, 1], bias 0; random: nn.Conv1d's default"
        )
        gate_bias_init: float = Field(1.2785, description="initial z_bias (silu(1.2785) ≈ 1)")
        D_init: float = Field(1.0, description="initial skip D, per head")
        a_init: float = Field(
            0.9, gt=0.0, lt=1.0, description="initial decay a, set through A_log_bias: exp(−softplus(A_log_bias)) = a"
        )
        bc_transfer: Literal["attention", "average"] = Field(
            "attention",
            description="from_attention: 'attention' sets C ← q/√d, B ← k (MOHAWK); 'average' "
            "starts B and C at a constant so that M is a normalised moving average "
            "of x with decay a_init (x ← v and out_proj ← o either way)",
        )
        kernel: KernelChoice = Field("auto", description=KERNEL_HELP)

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        super().__init__(geometry, config)
        config = self.config
        self.num_heads = H = config.num_heads or geometry.num_heads
        self.head_dim = P = config.head_dim or geometry.head_dim
        self.d_state = N = config.d_state or geometry.head_dim
        self.d_conv = config.d_conv
        self.conv_dim = H * P + 2 * H * N  # channels of x‖B‖C
        self.decay_dim = H * N if self.decay_per_state else H  # width of A_log
        D_model = geometry.hidden_size

        self.in_proj = nn.Linear(D_model, 2 * H * P + 2 * H * N + self.decay_dim, bias=False)  # → x, B, C, z, A_log
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1, bias=True
        )
        self.A_log_bias = nn.Parameter(
            torch.full((self.decay_dim,), math.log(1 / config.a_init - 1))
        )  # softplus⁻¹(−log a)
        self.z_bias = nn.Parameter(torch.full((H * P,), config.gate_bias_init))
        self.D = nn.Parameter(torch.full((H,), config.D_init))
        self.out_proj = nn.Linear(H * P, D_model, bias=geometry.output_bias)

        with torch.no_grad():
            self._rows("z").zero_()
            if self.out_proj.bias is not None:
                self.out_proj.bias.zero_()
            if config.conv_init == "identity":
                self.conv1d.weight.zero_()
                self.conv1d.weight[:, 0, -1] = 1.0
                self.conv1d.bias.zero_()

    def _rows(self, name: str) -> torch.Tensor:
        """The rows of ``in_proj.weight`` that produce ``name`` (x, B, C, z or A_log), as a view."""
        H, P, N = self.num_heads, self.head_dim, self.d_state
        rows = self.in_proj.weight.split([H * P, H * N, H * N, H * P, self.decay_dim])
        return dict(zip(("x", "B", "C", "z", "A_log"), rows))[name]

    def _start_as_moving_average(self) -> None:
        """B, C rows 0 and conv biases √(1 − a)·e₀ on the B and C channels: C_i·B_j = 1 − a for all i, j."""
        H, P, N = self.num_heads, self.head_dim, self.d_state
        level = math.sqrt(1 - self.config.a_init)
        with torch.no_grad():
            self._rows("B").zero_()
            self._rows("C").zero_()
            bias_B, bias_C = self.conv1d.bias[H * P :].view(2, H, N).unbind(0)
            bias_B.zero_()
            bias_C.zero_()
            bias_B[:, 0] = level
            bias_C[:, 0] = level

    # -- shared pieces -------------------------------------------------------------------------
    def _project(self, hidden_states: torch.Tensor, conv_state: torch.Tensor | None = None):
        """(B, T, D) → x (B, T, H, P), B, C (B, T, H, N), z (B, T, H·P), log_a, conv state.

        log_a is (B, T, H), or (B, T, H, N) when ``decay_per_state``. ``conv_state`` (B, conv_dim, d_conv−1):
        the pre-conv x‖B‖C of the tokens before this sequence (None: zeros); the returned conv state holds
        the last d_conv−1 pre-conv inputs.
        """
        batch, length, _ = hidden_states.shape
        H, P, N = self.num_heads, self.head_dim, self.d_state
        xBC, z, A_log = self.in_proj(hidden_states).split([self.conv_dim, H * P, self.decay_dim], dim=-1)
        conv_out, new_conv_state = causal_conv1d(
            xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, conv_state, kernel=self.config.kernel
        )  # (B, conv_dim, T)
        x, B, C = conv_out.transpose(1, 2).split([H * P, H * N, H * N], dim=-1)
        return (
            x.reshape(batch, length, H, P),
            B.reshape(batch, length, H, N),
            C.reshape(batch, length, H, N),
            z,
            self._log_a(A_log),
            new_conv_state,
        )

    def _log_a(self, A_log: torch.Tensor) -> torch.Tensor:
        """(…, decay_dim) → log decay −softplus(A_log + A_log_bias): (…, H) or (…, H, N)."""
        log_a = -F.softplus(A_log + self.A_log_bias)
        return log_a.unflatten(-1, (self.num_heads, self.d_state)) if self.decay_per_state else log_a

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SSD output y and x (…, H, P), gate z (…, H·P) → out_proj((y + D x) ⊙ silu(z + z_bias)), (…, D)."""
        y = (y + self.D[:, None] * x).flatten(-2)
        return self.out_proj(y * F.silu(z + self.z_bias))

    # -- SequenceMixer -------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) and the state after the last token (chunked SSD); ``rotary`` is unused."""
        x, B, C, z, log_a, conv_state = self._project(hidden_states, None if state is None else state["conv"])
        y, ssm_state = ssd(
            x, log_a, B, C, self.config.chunk_size, None if state is None else state["ssm"], kernel=self.config.kernel
        )
        return self._output(y, x, z), {"conv": conv_state, "ssm": ssm_state}

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → row blocks of M (B, H, T, T) = L ∘ (C Bᵀ), keeping only B, C and the decays (O(T)
        memory); the pre-gate output is M @ x + D x."""
        _, B, C, _, log_a, _ = self._project(hidden_states)
        return ssd_matrix_rows(log_a, B, C, self.config.chunk_size)

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → (B, T, D) = out_proj((M @ x + D x) ⊙ silu(z + z_bias))."""
        x, _, _, z, _, _ = self._project(hidden_states)
        M = self.mixing_matrix(hidden_states, rotary)  # (B, H, T, T)
        y = (M @ x.transpose(1, 2)).transpose(1, 2)  # (B, T, H, P)
        return self._output(y, x, z)

    def matrix_parameters(self) -> list[nn.Parameter]:
        """Parameters that shape M: in_proj, conv and A_log_bias.

        Only in_proj's B, C and A_log rows (and the conv's B and C channels) get gradient from a matrix
        loss; the x and z rows and the x channels of the conv sit in the same tensors and receive none.
        """
        return [self.in_proj.weight, self.conv1d.weight, self.conv1d.bias, self.A_log_bias]

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """{"conv": (B, conv_dim, d_conv−1) pre-conv inputs, "ssm": (B, H, N, P)}, all zeros."""
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
        """One token (B, D) and the state → (B, D) and the next state; ``rotary`` is unused."""
        batch = hidden_state.shape[0]
        H, P, N = self.num_heads, self.head_dim, self.d_state
        xBC, z, A_log = self.in_proj(hidden_state).split([self.conv_dim, H * P, self.decay_dim], dim=-1)
        conv_out, conv_state = causal_conv1d_step(xBC, self.conv1d.weight, self.conv1d.bias, state["conv"])
        x, B, C = conv_out.split([H * P, H * N, H * N], dim=-1)
        x = x.reshape(batch, H, P)
        y, ssm_state = ssd_step(x, self._log_a(A_log), B.reshape(batch, H, N), C.reshape(batch, H, N), state["ssm"])
        return self._output(y, x, z), {"conv": conv_state, "ssm": ssm_state}

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: Config | None = None
    ) -> DiscreteMamba2:
        """Transfer: C ← q · scale (1/√d folded into C), B ← k, x ← v, out_proj ← o; z and A_log rows 0.

        With ``bc_transfer: average`` the B and C rows start at zero and the conv biases of the B and C
        channels at √(1 − a) on state dimension 0, so C_i·B_j = 1 − a and M = L ∘ (C Bᵀ) starts as an
        exponential moving average of x whose rows sum to ≈ 1, like attention's rows. Without softmax the
        transferred q·k scores are unnormalised and far from attention; the average is a closer start
        (SmolLM2-135M held-out perplexity right after transfer: ~3e3 against ~7e6, teacher 45).

        K/V heads are repeated for grouped-query attention as transformers' ``repeat_kv`` does (kv head g
        serves query heads g·H/H_kv … (g+1)·H/H_kv − 1). A teacher's q/k norm contributes its elementwise
        gain (``fold_qk_norm``; its per-token 1/rms cannot be folded). q/k/v biases are dropped (in_proj has none);
        the o bias is copied. Needs N = P = head_dim and H = num_heads.
        """
        weights = fold_qk_norm(weights, geometry)
        mixer = cls(geometry, config)
        d = geometry.head_dim
        mixer.require_teacher_shapes(
            d_state=(mixer.d_state, d), head_dim=(mixer.head_dim, d), num_heads=(mixer.num_heads, geometry.num_heads)
        )
        with torch.no_grad():
            mixer._rows("x").copy_(repeat_kv_rows(geometry, weights.v))
            if mixer.config.bc_transfer == "attention":
                mixer._rows("B").copy_(repeat_kv_rows(geometry, weights.k))
                mixer._rows("C").copy_(weights.q * geometry.scale)
            else:
                mixer._start_as_moving_average()
            mixer._rows("z").zero_()
            mixer._rows("A_log").zero_()
            mixer.out_proj.weight.copy_(weights.o)
            if mixer.out_proj.bias is not None and weights.o_bias is not None:
                mixer.out_proj.bias.copy_(weights.o_bias)
        return mixer


@hookimpl
def register_mixers(register):
    register("discrete_mamba2", DiscreteMamba2)
