"""The mLSTM mixer (xLSTM, Beck et al. 2024): matrix memory with exponential input and sigmoid forget gates.

The layer around the cell is the delta-rule students' (``QKVMixer``): q, k, v projections transferred from
attention, a short causal conv over q‖k‖v, a learnable per-head query scale (starting at 1/√head_dim, the
mLSTM's key scaling), a per-head RMS norm and an output gate before o_proj. Per head and token the gates
are ĩ_t = w_i·u_t + b_i (input gate e^{ĩ}) and log f_t = logsigmoid(w_f·u_t + b_f); the cell and its
normaliser and stabiliser are ``mixerdistill.ops.mlstm``.

Mixing matrix: y = M v with M the *normaliser-divided* matrix, M[t, j] = S[t, j] / max(|Σ_j S[t, j]|, 1),
S[t, j] = (q_t·k_j) e^{Σ_{m=j+1..t} log f_m + ĩ_j}: y is the cell output h before norm and gate. q and k
are not L2-normalised (the normaliser bounds the rows instead). The output gate is sigmoid(o_proj_gate u)
in xLSTM; here it is the shared silu gate, which the norm's weight can rescale. No fused kernel exists for
this cell (the ``kernel`` option applies to the conv only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import AttentionGeometry
from mixerdistill.ops.mlstm import mlstm_chunked, mlstm_matrix_rows, mlstm_step
from mixerdistill_plugins.delta_net import QKVMixer


class MLSTM(QKVMixer):
    """mLSTM: C_t = f_t C_{t−1} + i_t k_t v_tᵀ, n_t = f_t n_{t−1} + i_t k_t, h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)."""

    normalise_qk = False

    class Config(QKVMixer.Config):
        forget_init: float = Field(0.9, gt=0.0, lt=1.0, description="initial forget gate f (w_f starts at 0)")
        input_init: float = Field(0.0, description="initial log input gate ĩ (w_i starts at 0)")

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        config = config if config is not None else self.Config()
        super().__init__(geometry, config)
        H = self.num_heads
        self.i_proj = nn.Linear(geometry.hidden_size, H)
        self.f_proj = nn.Linear(geometry.hidden_size, H)
        with torch.no_grad():
            for linear, bias in (
                (self.i_proj, config.input_init),
                (self.f_proj, math.log(config.forget_init / (1 - config.forget_init))),
            ):
                linear.weight.zero_()
                linear.bias.fill_(bias)

    def _gates(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, D) → log f (…, H) ≤ 0 and ĩ = log i (…, H)."""
        return F.logsigmoid(self.f_proj(hidden_states)), self.i_proj(hidden_states)

    def _cell(self, q, k, v, gates, state):
        carried = None if state is None else (state["C"], state["n"], state["m"])
        h, (memory, normaliser, stabiliser) = mlstm_chunked(q, k, v, *gates, self.config.chunk_size, carried)
        return h, {"C": memory, "n": normaliser, "m": stabiliser}

    def _cell_step(self, q, k, v, gates, state):
        h, (memory, normaliser, stabiliser) = mlstm_step(q, k, v, *gates, (state["C"], state["n"], state["m"]))
        return h, {"C": memory, "n": normaliser, "m": stabiliser}

    def _cell_rows(self, q, k, gates):
        return mlstm_matrix_rows(q, k, *gates)

    def _cell_state(self, batch_size, device, dtype):
        """{"C": (B, H, d, d), "n": (B, H, d), "m": (B, H)} zeros."""
        H, d = self.num_heads, self.head_dim
        return {
            "C": torch.zeros(batch_size, H, d, d, device=device, dtype=dtype),
            "n": torch.zeros(batch_size, H, d, device=device, dtype=dtype),
            "m": torch.zeros(batch_size, H, device=device, dtype=dtype),
        }


@hookimpl
def register_mixers(register):
    register("mlstm", MLSTM)
