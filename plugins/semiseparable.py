"""The general semiseparable mixer: discrete Mamba-2 with one decay per (head, state dimension).

    S_t = diag(a_t) S_{t−1} + B_t x_tᵀ,  a_t = exp(−softplus(A_log_t + A_log_bias)) ∈ (0, 1)^N

so M[i, j] = Σ_n C_{i,n} B_{j,n} Π_{k=j+1..i} a_{k,n}: a sum of N rank-one SSD matrices, each with its own
decay. SSD (``discrete_mamba2``) is the special case where all N decays agree. Everything else — in_proj
layout (with A_log N times wider), conv, gate, skip D, transfer from attention — is discrete Mamba-2's.
MOHAWK's stage-1 ablation finds this family closest to attention matrices.
"""

from __future__ import annotations

from mixerdistill.hookspecs import hookimpl
from mixerdistill_plugins.discrete_mamba2 import DiscreteMamba2


class Semiseparable(DiscreteMamba2):
    """Discrete Mamba-2 with a diagonal (per state dimension) instead of scalar state transition."""

    decay_per_state = True


@hookimpl
def register_mixers(register):
    register("semiseparable", Semiseparable)
