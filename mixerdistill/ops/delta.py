"""The (gated) delta rule in plain PyTorch: chunked (WY/UT form), token by token, and its exact mixing matrix.

Per head, state S_t (N × P, keys × values), keys k_t and queries q_t (N), values v_t (P), a write strength
β_t ∈ (0, 1) and a decay α_t ∈ (0, 1] (α = 1: DeltaNet; Gated DeltaNet, Yang et al. 2024):

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ        o_t = S_tᵀ q_t

(the transpose of the v-first form S_t = S_{t−1} α_t (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t).

Exact mixing matrix. Write the state as a decayed sum of rank-one writes, S_t = Σ_{j≤t} Γ[t, j] k_j u_jᵀ
with Γ[t, j] = Π_{m=j+1..t} α_m. Substituting into the recurrence gives the pseudo-values
u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t) = β_t v_t − β_t Σ_{j<t} Γ[t, j] (k_t · k_j) u_j, i.e.

    (I + A) U = diag(β) V,    A = strictly-lower(diag(β) K Kᵀ ∘ Γ)
    O = (tril(Q Kᵀ) ∘ Γ) U  =  M V,    M = (tril(Q Kᵀ) ∘ Γ) (I + A)⁻¹ diag(β)

(I + A) is unit lower-triangular, so M comes from one triangular solve. With a state S_0 entering a chunk
(local cumulative log decay g, from the chunk start), the same algebra gives

    U = (I + A)⁻¹ diag(β) (V − diag(e^g) K S_0)
    O = diag(e^g) Q S_0 + (tril(Q Kᵀ) ∘ Γ) U          S_end = e^{g_last} S_0 + Kᵀ diag(e^{g_last − g}) U

which is the chunked path: a Q × Q solve per chunk and a loop over chunks (not tokens), so time and memory
grow linearly in T. Every exponent is a log decay over a span inside one chunk, ≤ 0: nothing overflows.

The mixing matrix is built by the same chunk step with V the identity: the state then holds, for every
earlier token j, the column that v_j contributes (N × j), so a block of rows of M costs O(T·N) memory.

Layout everywhere: (B, T, H, ·); states (B, H, N, P). Queries arrive already scaled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixerdistill.mixer import MatrixRows
from mixerdistill.ops.kernels import KernelChoice, kernel_module
from mixerdistill.ops.ssd import segsum

ChunkStep = Callable[..., tuple[torch.Tensor, object]]


def scan_chunks(
    step: ChunkStep,
    sequences: tuple[torch.Tensor, ...],
    state,
    chunk_size: int,
) -> tuple[torch.Tensor, object]:
    """Run ``step(*chunk_of_each_sequence, state) → (output, state)`` over chunks of ``chunk_size`` tokens.

    sequences: tensors (B, H, T, ·) or (B, H, T); outputs (B, H, Q, ·) are concatenated to (B, H, T, ·).
    The last chunk may be shorter: every step here works for any chunk length, so nothing is padded.
    The chunks come from ``split``, whose backward is one concatenation: slicing each chunk instead would
    make autograd write every chunk's gradient into a zero tensor of the full length, O(T²) in all.
    """
    outputs = []
    for chunk in zip(*(s.split(chunk_size, dim=2) for s in sequences)):
        output, state = step(*chunk, state)
        outputs.append(output)
    return torch.cat(outputs, dim=2), state


def heads_first(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, T, H, ·) or (B, T, H) → (B, H, T, ·) or (B, H, T)."""
    return tuple(t.transpose(1, 2) for t in tensors)


def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_a: torch.Tensor | None,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of Q tokens in the WY/UT form (see the module docstring).

    q, k: (B, H, Q, N)   v: (B, H, Q, P)   beta: (B, H, Q)   log_a: (B, H, Q) or None (α = 1)
    state: (B, H, N, P) entering the chunk   →   o: (B, H, Q, P), state after the chunk (B, H, N, P).
    """
    length = q.shape[2]
    scores = q @ k.transpose(-1, -2)  # (B, H, Q, Q)
    overlaps = k @ k.transpose(-1, -2)
    if log_a is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        decay = causal.to(q.dtype)
        from_start = to_end = None
    else:
        decay = torch.exp(segsum(log_a)).to(q.dtype)  # Γ inside the chunk, 0 above the diagonal
        cum = torch.cumsum(log_a.to(torch.promote_types(log_a.dtype, torch.float32)), dim=-1)
        from_start = torch.exp(cum).to(q.dtype)[..., None]  # (B, H, Q, 1): e^g
        to_end = torch.exp(cum[..., -1:] - cum).to(q.dtype)[..., None]  # e^{g_last − g}
    unit_lower = torch.eye(length, dtype=q.dtype, device=q.device) + (beta[..., None] * overlaps * decay).tril(-1)
    k_from_start = k if from_start is None else k * from_start
    targets = beta[..., None] * (v - k_from_start @ state)  # diag(β)(V − diag(e^g) K S_0)
    pseudo_values = torch.linalg.solve_triangular(unit_lower, targets, upper=False, unitriangular=True)  # U
    q_from_start = q if from_start is None else q * from_start
    output = q_from_start @ state + (scores * decay) @ pseudo_values
    if log_a is None:
        return output, state + k.transpose(-1, -2) @ pseudo_values
    chunk_decay = from_start[..., -1:, :]  # (B, H, 1, 1): e^{g_last}
    return output, chunk_decay * state + (k * to_end).transpose(-1, -2) @ pseudo_values


def delta_rule_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    beta_t: torch.Tensor,
    log_a_t: torch.Tensor | None,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: S ← α (S − β k (kᵀ S)) + β k vᵀ, o = Sᵀ q.

    q_t, k_t: (B, H, N)   v_t: (B, H, P)   beta_t, log_a_t: (B, H) (log_a_t None: α = 1)   state: (B, H, N, P)
    → o_t: (B, H, P), new state (B, H, N, P).
    """
    if log_a_t is not None:
        state = torch.exp(log_a_t).to(state.dtype)[..., None, None] * state
    recalled = (k_t.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, P): what the state holds under k_t
    state = state + (beta_t[..., None] * k_t).unsqueeze(-1) * (v_t - recalled).unsqueeze(-2)
    return (q_t.unsqueeze(-2) @ state).squeeze(-2), state


def delta_rule_matrix_rows(
    q: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, log_a: torch.Tensor | None, chunk_size: int = 64
) -> MatrixRows:
    """Row blocks of the exact mixing matrix M = (tril(Q Kᵀ) ∘ Γ)(I + A)⁻¹ diag(β): ``rows(start, stop)`` →
    M[:, :, start:stop, :stop] (B, H, stop − start, stop). q, k: (B, T, H, N); beta, log_a: (B, T, H).

    Runs ``delta_rule_chunk`` over tokens 0 … stop − 1 with the identity as values: the state (B, H, N, j)
    after j tokens maps the values seen so far to the state, and each chunk's output rows are rows of M.
    Memory O(T·N) per head besides the block itself.
    """
    q, k, beta = heads_first(q, k, beta)
    log_a = None if log_a is None else heads_first(log_a)[0]
    batch, heads, _, n = k.shape

    def rows(start: int, stop: int) -> torch.Tensor:
        sequences = (q, k, beta) if log_a is None else (q, k, beta, log_a)
        state = k.new_zeros(batch, heads, n, 0)  # columns: the tokens seen so far
        begin, blocks = 0, []
        for q_c, k_c, beta_c, *log_a_c in zip(*(s[:, :, :stop].split(chunk_size, dim=2) for s in sequences)):
            end = begin + q_c.shape[2]
            identity = F.pad(torch.eye(end - begin, dtype=k.dtype, device=k.device), (begin, 0))  # (Q, end): v_j = e_j
            block, state = delta_rule_chunk(
                q_c,
                k_c,
                identity.expand(batch, heads, -1, -1),
                beta_c,
                log_a_c[0] if log_a_c else None,
                F.pad(state, (0, end - begin)),
            )
            if end > start:
                blocks.append(F.pad(block[:, :, max(start - begin, 0) :], (0, stop - end)))
            begin = end
        return torch.cat(blocks, dim=2)

    return rows


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_a: torch.Tensor | None,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    kernel: KernelChoice = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked delta rule, the path mixers call.

    q, k: (B, T, H, N)   v: (B, T, H, P)   beta, log_a: (B, T, H) (log_a None: α = 1)
    initial_state: (B, H, N, P) or None (zeros)   →   o: (B, T, H, P), final state (B, H, N, P).

    Reference: ``delta_rule_chunk`` in a loop over chunks. Kernels (fla, see ``mixerdistill.ops.kernels``):
    ``chunk_gated_delta_rule`` with ``log_a``, ``chunk_delta_rule`` without; fed the queries as they are
    (scale 1.0) and keys already normalised by the caller (no in-kernel L2 norm).
    """
    if log_a is None:
        fla = kernel_module(kernel, "fla.ops.delta_rule", "delta rule", q)
        if fla is not None:
            return fla.chunk_delta_rule(q, k, v, beta, scale=1.0, initial_state=initial_state, output_final_state=True)
    else:
        fla = kernel_module(kernel, "fla.ops.gated_delta_rule", "gated delta rule", q)
        if fla is not None:
            return fla.chunk_gated_delta_rule(
                q, k, v, log_a, beta, scale=1.0, initial_state=initial_state, output_final_state=True
            )
    batch, _, heads, n = k.shape
    if initial_state is None:
        initial_state = v.new_zeros(batch, heads, n, v.shape[-1])
    sequences = heads_first(q, k, v, beta) + (() if log_a is None else heads_first(log_a))

    def step(q_c, k_c, v_c, beta_c, *rest):
        *log_a_c, state = rest
        return delta_rule_chunk(q_c, k_c, v_c, beta_c, log_a_c[0] if log_a_c else None, state)

    output, final_state = scan_chunks(step, sequences, initial_state.to(v.dtype), chunk_size)
    return output.transpose(1, 2), final_state
