"""SSD (state space duality, Mamba-2) with one B and one C per head, in plain PyTorch.

Notation (Dao & Gu, 2024): per head, state S_t (N × P), decay a_t ∈ (0, 1], inputs x_t (P), B_t, C_t (N):

    S_t = a_t S_{t−1} + B_t x_tᵀ        y_t = C_tᵀ S_t

equivalently y = M x with M[i, j] = (C_i · B_j) · Π_{k=j+1..i} a_k for j ≤ i, 0 above the diagonal.
Decays enter as ``log_a = log a_t ≤ 0``. Layout everywhere: (B, T, H, ·); states (B, H, N, P).

Three paths that must agree: ``ssd_materialised_matrix`` (the T × T matrix, stage 1 and tests; built by
row blocks with ``ssd_matrix_rows``), ``ssd_chunked`` (the fast path) and ``ssd_step`` (one token,
recurrent decoding).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mixerdistill.mixer import MatrixRows
from mixerdistill.ops.kernels import KernelChoice, kernel_module
from mixerdistill.ops.segsum import segsum


def ssd_materialised_matrix(
    log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int = 64
) -> torch.Tensor:
    """The SSD mixing matrix M = L ∘ (C Bᵀ), L[i, j] = exp(Σ_{k=j+1..i} log_a_k) (lower-triangular).

    log_a: (B, T, H) ≤ 0    B, C: (B, T, H, N)    →    M: (B, H, T, T), dtype of C.
    With log_a (B, T, H, N), a decay per state dimension, this is
    ``mixerdistill.ops.diagonal.diagonal_materialised_matrix`` (``chunk_size`` bounds its memory).
    """
    length = C.shape[1]
    return ssd_matrix_rows(log_a, B, C, chunk_size)(0, length)


def ssd_matrix_rows(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int = 64) -> MatrixRows:
    """Row blocks of the SSD mixing matrix without materialising it: ``rows(start, stop)`` →
    M[:, :, start:stop, :stop] (B, H, stop − start, stop). Shapes as ``ssd_materialised_matrix``.

    Only the (B, H, T) cumulative log decay is kept between calls. A decay per state dimension has no such
    factorisation here: its matrix is materialised once and sliced.
    """
    if log_a.dim() == 4:
        from mixerdistill.ops.diagonal import diagonal_materialised_matrix

        matrix = diagonal_materialised_matrix(log_a, B, C, chunk_size)
        return lambda start, stop: matrix[:, :, start:stop, :stop]
    cum = torch.cumsum(log_a.transpose(1, 2).to(torch.promote_types(log_a.dtype, torch.float32)), dim=-1)  # (B, H, T)
    B_heads, C_heads = B.transpose(1, 2), C.transpose(1, 2)  # (B, H, T, N)

    def rows(start: int, stop: int) -> torch.Tensor:
        above = torch.arange(start, stop, device=cum.device)[:, None] < torch.arange(stop, device=cum.device)
        decay = (cum[..., start:stop, None] - cum[..., None, :stop]).masked_fill_(above, float("-inf")).exp_()
        return (C_heads[:, :, start:stop] @ B_heads[:, :, :stop].transpose(-1, -2)) * decay.to(C.dtype)

    return rows


def ssd_chunked(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD: quadratic inside chunks of Q = ``chunk_size`` tokens, state passing between chunks.

    x: (B, T, H, P)   log_a: (B, T, H)   B, C: (B, T, H, N)   initial_state: (B, H, N, P) or None (zeros)
    → y: (B, T, H, P), final_state: (B, H, N, P) (the state after token T).

    T need not be a multiple of Q: the end is padded with a = 1 and B = C = x = 0, which changes neither
    the outputs nor the final state. Batched matmuls inside chunks and a loop over chunks (not tokens) for
    the state passing, so time and memory grow linearly in T; the backward pass is written out by hand
    (``_ChunkedSSD``), which halves autograd's time on CPU.
    """
    batch, length, heads, _ = x.shape
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (B, T, H, ·) → (B, H, c, Q, ·)
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        return t.reshape(batch, n_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4).contiguous()

    log_a_c = chunks(log_a.unsqueeze(-1)).squeeze(-1).to(torch.promote_types(log_a.dtype, torch.float32))
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, B.shape[-1], x.shape[-1])
    y, final_state = _ChunkedSSD.apply(chunks(x), log_a_c, chunks(B), chunks(C), initial_state.to(x.dtype))
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * chunk_size, heads, -1)[:, :length]
    return y, final_state


class _ChunkedSSD(torch.autograd.Function):
    """SSD on chunked tensors with a hand-written backward.

    x: (B, H, c, Q, P)   log_a: (B, H, c, Q) fp32   B, C: (B, H, c, Q, N)   initial_state: (B, H, N, P)
    → y: (B, H, c, Q, P), final_state: (B, H, N, P).

    With cum = cumsum of log_a inside each chunk and G = (C Bᵀ) ∘ exp(cum_i − cum_j) (causal):
        y = G x + (C ∘ e^cum) S_z        S_{z+1} = e^{cum_last} S_z + (B ∘ e^{cum_last − cum})ᵀ x
    where S_z is the state entering chunk z (S_0 the initial state, S_c the final state).
    """

    @staticmethod
    def forward(ctx, x, log_a, B, C, initial_state):
        cum = torch.cumsum(log_a, dim=-1)  # (B, H, c, Q)
        decay = torch.exp(segsum(log_a)).to(x.dtype)  # (B, H, c, Q, Q), 0 above the diagonal
        G = (C @ B.transpose(-1, -2)).mul_(decay)  # (B, H, c, Q, Q)
        to_end = torch.exp(cum[..., -1:] - cum).to(x.dtype)  # (B, H, c, Q)
        B_to_end = B * to_end[..., None]  # (B, H, c, Q, N)
        chunk_decay = torch.exp(cum[..., -1]).to(x.dtype)  # (B, H, c)
        states = _scan(initial_state, chunk_decay, B_to_end.transpose(-1, -2) @ x)  # (B, H, c + 1, N, P)
        from_start = torch.exp(cum).to(x.dtype)  # (B, H, c, Q)
        C_from_start = C * from_start[..., None]  # (B, H, c, Q, N)
        y = (G @ x).add_(C_from_start @ states[:, :, :-1])  # (B, H, c, Q, P)
        ctx.save_for_backward(x, B, C, decay, G, to_end, B_to_end, chunk_decay, states, from_start, C_from_start)
        return y, states[:, :, -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, d_final):
        x, B, C, decay, G, to_end, B_to_end, chunk_decay, states, from_start, C_from_start = ctx.saved_tensors
        dy = dy.contiguous()
        # y = G x, G = (C Bᵀ) ∘ decay; ∂G_ij/∂cum_i = G_ij = −∂G_ij/∂cum_j.
        dG = dy @ x.transpose(-1, -2)  # (B, H, c, Q, Q)
        dx = G.transpose(-1, -2) @ dy  # (B, H, c, Q, P)
        d_scores = dG * decay
        dC = d_scores @ B  # (B, H, c, Q, N)
        dB = d_scores.transpose(-1, -2) @ C
        dG.mul_(G)
        d_cum = dG.sum(-1) - dG.sum(-2)  # (B, H, c, Q)
        # y += (C ∘ e^cum) S_z.
        d_C_from_start = dy @ states[:, :, :-1].transpose(-1, -2)  # (B, H, c, Q, N)
        dC += d_C_from_start * from_start[..., None]
        d_cum += (d_C_from_start * C_from_start).sum(-1)
        d_entering = C_from_start.transpose(-1, -2) @ dy  # (B, H, c, N, P): ∂loss/∂S_z through chunk z's y
        # The state passing, run backwards: g_z = d_entering_z + e^{cum_last_z} g_{z+1}, g_c = d_final.
        d_states = _scan(d_final, chunk_decay, d_entering, reverse=True)  # (B, H, c + 1, N, P)
        d_chunk_states = d_states[:, :, 1:]  # ∂loss/∂S_{z+1} = ∂loss/∂(chunk z's own state)
        d_cum[..., -1] += (d_chunk_states * states[:, :, :-1]).sum((-1, -2)) * chunk_decay
        # Chunk z's own state (B ∘ e^{cum_last − cum})ᵀ x.
        dx += B_to_end @ d_chunk_states
        d_B_to_end = x @ d_chunk_states.transpose(-1, -2)  # (B, H, c, Q, N)
        dB += d_B_to_end * to_end[..., None]
        d_to_end = (d_B_to_end * B_to_end).sum(-1)  # (B, H, c, Q), already times e^{cum_last − cum}
        d_cum -= d_to_end
        d_cum[..., -1] += d_to_end.sum(-1)
        # cum = cumsum(log_a): ∂loss/∂log_a_k = Σ_{i ≥ k} ∂loss/∂cum_i.
        d_log_a = d_cum - d_cum.cumsum(-1) + d_cum.sum(-1, keepdim=True)
        return dx, d_log_a, dB, dC, d_states[:, :, 0]


def _scan(initial: torch.Tensor, decay: torch.Tensor, inputs: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """S_0 = initial, S_{z+1} = decay_z S_z + inputs_z; one step per chunk, not per token.

    initial: (B, H, N, P)   decay: (B, H, c)   inputs: (B, H, c, N, P)   →   S: (B, H, c + 1, N, P).
    ``reverse`` runs the recurrence from the end (the backward pass): S_c = initial,
    S_z = decay_z S_{z+1} + inputs_z. Computed chunk-major, so every step reads and writes contiguous memory.
    """
    inputs = inputs.movedim(2, 0).contiguous()  # (c, B, H, N, P)
    decay = decay.movedim(2, 0)[..., None, None].contiguous()  # (c, B, H, 1, 1)
    chunks = inputs.shape[0]
    states = inputs.new_empty((chunks + 1,) + inputs.shape[1:])
    if reverse:
        states[chunks] = initial
        for z in reversed(range(chunks)):
            torch.addcmul(inputs[z], decay[z], states[z + 1], out=states[z])
    else:
        states[0] = initial
        for z in range(chunks):
            torch.addcmul(inputs[z], decay[z], states[z], out=states[z + 1])
    return states.movedim(0, 2)


def ssd_step(
    x_t: torch.Tensor, log_a_t: torch.Tensor, B_t: torch.Tensor, C_t: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: S ← a S + B xᵀ, y = Cᵀ S.

    x_t: (B, H, P)   log_a_t: (B, H), or (B, H, N) for a decay per state dimension
    B_t, C_t: (B, H, N)   state: (B, H, N, P)   →   y_t: (B, H, P), new state: (B, H, N, P).
    """
    a_t = torch.exp(log_a_t).to(state.dtype)
    a_t = a_t[..., None] if log_a_t.dim() == 3 else a_t[..., None, None]  # (B, H, N, 1) or (B, H, 1, 1)
    state = a_t * state + B_t.unsqueeze(-1) * x_t.unsqueeze(-2)  # (B, H, N, P)
    y_t = (C_t.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, 1, N) @ (B, H, N, P) → (B, H, P)
    return y_t, state


def ssd(
    x: torch.Tensor,
    log_a: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    kernel: KernelChoice = "auto",
    library: Literal["mamba_ssm", "fla"] = "mamba_ssm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path mixers call: same arguments and results as ``ssd_chunked``.

    ``log_a`` (B, T, H) is a scalar decay per head; (B, T, H, N) a decay per state dimension, computed by
    ``mixerdistill.ops.diagonal.diagonal_chunked`` (kernel: fla's ``chunk_gla``). For scalar decays the
    kernel comes from ``library``: mamba-ssm's ``mamba_chunk_scan_combined`` (needs a < 1 everywhere: it
    is fed dt = −log a and x / dt) or fla's ``chunk_simple_gla`` (any a ≤ 1, e.g. linear attention's a = 1).
    See ``mixerdistill.ops.kernels`` for ``kernel``.
    """
    if log_a.dim() == 4:
        fla_gla = kernel_module(kernel, "fla.ops.gla", "diagonal-decay SSM", x)
        if fla_gla is None:
            from mixerdistill.ops.diagonal import diagonal_chunked

            return diagonal_chunked(x, log_a, B, C, chunk_size, initial_state)
        return fla_gla.chunk_gla(C, B, x, log_a, scale=1.0, initial_state=initial_state, output_final_state=True)
    if library == "fla":
        fla_simple = kernel_module(kernel, "fla.ops.simple_gla", "SSD", x)
        if fla_simple is not None:
            return fla_simple.chunk_simple_gla(
                C, B, x, g=log_a, scale=1.0, initial_state=initial_state, output_final_state=True
            )
        return ssd_chunked(x, log_a, B, C, chunk_size, initial_state)
    mamba = kernel_module(kernel, "mamba_ssm.ops.triton.ssd_combined", "SSD", x)
    if mamba is None:
        return ssd_chunked(x, log_a, B, C, chunk_size, initial_state)
    dt = (-log_a).clamp(min=1e-6)  # (B, T, H): decay exp(dt · A) with A = −1; the kernel's input is dt · x
    y, final_state = mamba.mamba_chunk_scan_combined(
        x / dt.unsqueeze(-1).to(x.dtype),
        dt,
        -torch.ones(x.shape[2], device=x.device, dtype=torch.float32),
        B,
        C,
        chunk_size,
        initial_states=None if initial_state is None else initial_state.transpose(-1, -2).contiguous(),
        return_final_states=True,
    )
    return y, final_state.transpose(-1, -2)  # the kernel's states are (B, H, P, N)
