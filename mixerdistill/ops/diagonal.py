"""SSMs whose state transition is diagonal per state dimension (general semiseparable / GLA), in plain PyTorch.

Per head, state S_t (N × P), decay a_t ∈ (0, 1]^N (one per state dimension), inputs x_t (P), B_t, C_t (N):

    S_t = diag(a_t) S_{t−1} + B_t x_tᵀ        y_t = C_tᵀ S_t

equivalently y = M x with M[i, j] = Σ_n C_{i,n} B_{j,n} Π_{k=j+1..i} a_{k,n} for j ≤ i. Scalar-decay SSD
(``mixerdistill.ops.ssd``) is the case a_{t,n} = a_t. Decays enter as ``log_a`` (B, T, H, N) ≤ 0.

Both paths work in chunks of Q tokens so that every exponent is a sum of log-decays over a span that does
not cross the point it is measured from: all factors stay ≤ 1 and nothing overflows, however long T is.
The recurrent step is ``mixerdistill.ops.ssd.ssd_step``, which accepts per-state-dimension decays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixerdistill.ops.segsum import segsum


def _chunks(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, T, H, ·) → (B, H, c, Q, ·), zero-padded at the end to a whole number of chunks."""
    batch, length, heads, width = t.shape
    n_chunks = -(-length // chunk_size)
    t = F.pad(t, (0, 0, 0, 0, 0, n_chunks * chunk_size - length))
    return t.reshape(batch, n_chunks, chunk_size, heads, width).permute(0, 3, 1, 2, 4)


def _pieces(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int):
    """What both paths share.

    → cum (B, H, c, Q, N): log decay from the chunk start to each token (inclusive), fp32 or wider;
      intra (B, H, c, Q, Q): the within-chunk blocks of M;
      C_in (B, H, c, Q, N) = C ⊙ exp(cum);  B_out (B, H, c, Q, N) = B ⊙ exp(cum_last − cum);
      totals (B, H, c, N): each chunk's whole log decay.
    Padding tokens have log_a = 0 and B = C = 0, so they add nothing.
    """
    log_a_c = _chunks(log_a, chunk_size).to(torch.promote_types(log_a.dtype, torch.float32))
    B_c, C_c = _chunks(B, chunk_size), _chunks(C, chunk_size)
    cum = torch.cumsum(log_a_c, dim=-2)  # (B, H, c, Q, N)
    decay = torch.exp(segsum(log_a_c.transpose(-1, -2))).to(C.dtype)  # (B, H, c, N, Q, Q)
    intra = torch.einsum("bhcin,bhcjn,bhcnij->bhcij", C_c, B_c, decay)  # (B, H, c, Q, Q)
    C_in = C_c * torch.exp(cum).to(C.dtype)
    B_out = B_c * torch.exp(cum[..., -1:, :] - cum).to(B.dtype)
    return cum, intra, C_in, B_out, cum[..., -1, :]


def diagonal_materialised_matrix(
    log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """M (B, H, T, T), lower-triangular, of the diagonal-decay SSM.

    log_a: (B, T, H, N) ≤ 0    B, C: (B, T, H, N).  ``chunk_size`` only bounds memory (B·H·T·Q·N floats).
    Block (z, w) with z > w is Σ_n C_in[z] · exp(decay over chunks w+1 … z−1) · B_out[w].
    """
    batch, length = B.shape[:2]
    _, intra, C_in, B_out, totals = _pieces(log_a, B, C, chunk_size)
    between = segsum(totals.transpose(-1, -2))  # (B, H, N, c, c): [z, w] = Σ totals over chunks w+1 … z
    # Decay from the end of chunk w to the start of chunk z is between[z − 1, w]; −inf (exp → 0) for z ≤ w.
    gap = torch.exp(F.pad(between, (0, 0, 1, 0), value=float("-inf"))[..., :-1, :]).to(C.dtype)
    M = torch.einsum("bhzqn,bhnzw,bhwkn->bhzqwk", C_in, gap, B_out)  # (B, H, c, Q, c, Q)
    n_chunks, size = intra.shape[2], intra.shape[3]
    same_chunk = torch.eye(n_chunks, dtype=intra.dtype, device=intra.device)
    M = M + torch.einsum("bhzqk,zw->bhzqwk", intra, same_chunk)  # the z = w blocks
    return M.reshape(batch, -1, n_chunks * size, n_chunks * size)[:, :, :length, :length]


def diagonal_chunked(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked diagonal-decay SSM.

    x: (B, T, H, P)   log_a: (B, T, H, N)   B, C: (B, T, H, N)   initial_state: (B, H, N, P) or None
    → y: (B, T, H, P), final_state: (B, H, N, P).
    """
    batch, length, heads, _ = x.shape
    cum, intra, C_in, B_out, totals = _pieces(log_a, B, C, chunk_size)
    x_c = _chunks(x, chunk_size)  # (B, H, c, Q, P)
    y = intra @ x_c  # (B, H, c, Q, P)
    chunk_states = B_out.transpose(-1, -2) @ x_c  # (B, H, c, N, P)
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, B.shape[-1], x.shape[-1])
    chunk_states = torch.cat([initial_state.unsqueeze(2).to(x.dtype), chunk_states], dim=2)  # (B, H, c+1, N, P)
    between = torch.exp(segsum(F.pad(totals, (0, 0, 1, 0)).transpose(-1, -2))).to(x.dtype)  # (B, H, N, c+1, c+1)
    states = torch.einsum("bhnzw,bhwnp->bhznp", between, chunk_states)  # (B, H, c+1, N, P)
    y = y + C_in @ states[:, :, :-1]  # the entering state's contribution
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, -1, heads, x.shape[-1])[:, :length]
    return y, states[:, :, -1]
