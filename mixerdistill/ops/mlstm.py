"""The mLSTM cell (xLSTM, Beck et al. 2024) in plain PyTorch: chunked, token by token, and its mixing matrix.

Per head, matrix memory C_t (N × P), normaliser n_t (N), input gate i_t = exp(ĩ_t) (exponential), forget
gate f_t = sigmoid(f̃_t) (log f_t = logsigmoid(f̃_t) ≤ 0), queries q_t (already scaled), keys k_t, values v_t:

    C_t = f_t C_{t−1} + i_t k_t v_tᵀ      n_t = f_t n_{t−1} + i_t k_t      h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)

Unrolled, with D[t, j] = Σ_{m=j+1..t} log f_m + ĩ_j (j ≤ t): C_tᵀ q_t = Σ_j e^{D[t, j]} (q_t·k_j) v_j and
n_tᵀ q_t = Σ_j e^{D[t, j]} (q_t·k_j), so h = M v with the *normaliser-divided* mixing matrix

    M[t, j] = S[t, j] / max(|Σ_j S[t, j]|, 1),     S[t, j] = (q_t·k_j) e^{D[t, j]}

— the normaliser is the row sum of the unnormalised matrix, and ``M @ v`` is h before the output gate.

Stabiliser. e^{ĩ} overflows, so every path carries m (the running max of the log weights) and stores
C' = C e^{−m}, n' = n e^{−m}: h = C'ᵀ q / max(|n'ᵀ q|, e^{−m}) is the same number for any m. The token
recurrence m_t = max(log f_t + m_{t−1}, ĩ_t) unrolls to max_j D[t, j] (and the initial m_0 carried by the
decays), which is what the chunked path computes per chunk, so the stored states agree exactly. The
matrix uses each row's own max over j.

State: {"C": (B, H, N, P), "n": (B, H, N), "m": (B, H)}; zeros before the first token.
Layout everywhere: (B, T, H, ·).
"""

from __future__ import annotations

import torch

from mixerdistill.mixer import MatrixRows
from mixerdistill.ops.delta import heads_first, scan_chunks
from mixerdistill.ops.ssd import segsum

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C' (B, H, N, P), n' (B, H, N), m (B, H)


def mlstm_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor, log_i: torch.Tensor, state: MLSTMState
) -> tuple[torch.Tensor, MLSTMState]:
    """One chunk of Q tokens (Q = 1 is the recurrent step).

    q, k: (B, H, Q, N)   v: (B, H, Q, P)   log_f, log_i: (B, H, Q)   state (C', n', m) entering the chunk
    → h: (B, H, Q, P), the state after the chunk.
    """
    memory, normaliser, m_in = state
    wide = torch.promote_types(log_f.dtype, torch.float32)
    log_f, log_i, m_in = log_f.to(wide), log_i.to(wide), m_in.to(wide)
    cum = torch.cumsum(log_f, dim=-1)  # (B, H, Q): log decay from the chunk start
    log_weights = segsum(log_f) + log_i[..., None, :]  # (B, H, Q, Q): D inside the chunk, −inf above
    log_carry = cum + m_in[..., None]  # (B, H, Q): log weight of the entering state
    m_row = torch.maximum(log_carry, log_weights.amax(-1))  # (B, H, Q)
    weights = torch.exp(log_weights - m_row[..., None]).to(q.dtype)
    carry = torch.exp(log_carry - m_row).to(q.dtype)[..., None]  # (B, H, Q, 1)
    scores = (q @ k.transpose(-1, -2)) * weights
    numerator = scores @ v + carry * (q @ memory)
    denominator = scores.sum(-1, keepdim=True) + carry * (q @ normaliser[..., None])
    floor = torch.exp(-m_row).to(q.dtype)[..., None]
    h = numerator / torch.maximum(denominator.abs(), floor)
    # The state after the chunk, stabilised by its own max.
    log_to_end = cum[..., -1:] - cum + log_i  # (B, H, Q)
    m_out = torch.maximum(cum[..., -1] + m_in, log_to_end.amax(-1))  # (B, H)
    kept = torch.exp(cum[..., -1] + m_in - m_out).to(q.dtype)  # (B, H)
    written = k * torch.exp(log_to_end - m_out[..., None]).to(q.dtype)[..., None]  # (B, H, Q, N)
    memory = kept[..., None, None] * memory + written.transpose(-1, -2) @ v
    normaliser = kept[..., None] * normaliser + written.sum(-2)
    return h, (memory, normaliser, m_out.to(state[2].dtype))


def mlstm_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_f: torch.Tensor,
    log_i: torch.Tensor,
    chunk_size: int,
    state: MLSTMState | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """q, k: (B, T, H, N)   v: (B, T, H, P)   log_f, log_i: (B, T, H)   state: (C', n', m) or None (zeros)
    → h: (B, T, H, P), the state after token T. Linear in T: a loop over chunks."""
    if state is None:
        batch, _, heads, n = k.shape
        state = (v.new_zeros(batch, heads, n, v.shape[-1]), v.new_zeros(batch, heads, n), v.new_zeros(batch, heads))
    h, state = scan_chunks(mlstm_chunk, heads_first(q, k, v, log_f, log_i), state, chunk_size)
    return h.transpose(1, 2), state


def mlstm_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    log_f_t: torch.Tensor,
    log_i_t: torch.Tensor,
    state: MLSTMState,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q_t, k_t (B, H, N), v_t (B, H, P), log_f_t, log_i_t (B, H) → h_t (B, H, P), next state."""
    h, state = mlstm_chunk(
        q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], log_f_t[..., None], log_i_t[..., None], state
    )
    return h[:, :, 0], state


def mlstm_matrix_rows(q: torch.Tensor, k: torch.Tensor, log_f: torch.Tensor, log_i: torch.Tensor) -> MatrixRows:
    """Row blocks of the normaliser-divided mixing matrix: ``rows(start, stop)`` → M[:, :, start:stop, :stop].

    q, k: (B, T, H, N)   log_f, log_i: (B, T, H). Keeps only the (B, H, T) cumulative log forget gate
    between calls (O(T) memory); each row is stabilised by its own max log weight.
    """
    q, k, log_i = heads_first(q, k, log_i)
    wide = torch.promote_types(log_f.dtype, torch.float32)
    cum = torch.cumsum(log_f.transpose(1, 2).to(wide), dim=-1)  # (B, H, T)
    log_i = log_i.to(wide)

    def rows(start: int, stop: int) -> torch.Tensor:
        above = torch.arange(start, stop, device=cum.device)[:, None] < torch.arange(stop, device=cum.device)
        log_weights = cum[..., start:stop, None] - cum[..., None, :stop] + log_i[..., None, :stop]
        log_weights = log_weights.masked_fill(above, float("-inf"))  # (B, H, r, stop)
        m_row = log_weights.amax(-1, keepdim=True)
        scores = (q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2)) * torch.exp(log_weights - m_row).to(q.dtype)
        floor = torch.exp(-m_row).to(q.dtype)
        return scores / torch.maximum(scores.sum(-1, keepdim=True).abs(), floor)

    return rows
