"""SSD (state space duality, Mamba-2) with one B and one C per head, in plain PyTorch.

Notation (Dao & Gu, 2024): per head, state S_t (N × P), decay a_t ∈ (0, 1], inputs x_t (P), B_t, C_t (N):

    S_t = a_t S_{t−1} + B_t x_tᵀ        y_t = C_tᵀ S_t

equivalently y = M x with M[i, j] = (C_i · B_j) · Π_{k=j+1..i} a_k for j ≤ i, 0 above the diagonal.
Decays enter as ``log_a = log a_t ≤ 0``. Layout everywhere: (B, T, H, ·); states (B, H, N, P).

Three paths that must agree: ``ssd_materialised_matrix`` (the T × T matrix, stage 1 and tests),
``ssd_chunked`` (the fast path) and ``ssd_step`` (one token, recurrent decoding).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mixerdistill.ops.kernels import KernelChoice, kernel_module


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """(..., T) → (..., T, T): out[i, j] = Σ_{k=j+1..i} log_a_k for j ≤ i, −inf above the diagonal.

    Cumsum differences, masked with −inf before any ``exp`` so nothing overflows and exp gives exact zeros.
    Computed in fp32 at least.
    """
    cumsum = torch.cumsum(log_a.to(torch.promote_types(log_a.dtype, torch.float32)), dim=-1)
    length = log_a.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril()
    return (cumsum[..., :, None] - cumsum[..., None, :]).masked_fill(~causal, float("-inf"))


def ssd_materialised_matrix(log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                            chunk_size: int = 64) -> torch.Tensor:
    """The SSD mixing matrix M = L ∘ (C Bᵀ), L[i, j] = exp(Σ_{k=j+1..i} log_a_k) (lower-triangular).

    log_a: (B, T, H) ≤ 0    B, C: (B, T, H, N)    →    M: (B, H, T, T), dtype of C.
    With log_a (B, T, H, N), a decay per state dimension, this is
    ``mixerdistill.ops.diagonal.diagonal_materialised_matrix`` (``chunk_size`` bounds its memory).
    """
    if log_a.dim() == 4:
        from mixerdistill.ops.diagonal import diagonal_materialised_matrix

        return diagonal_materialised_matrix(log_a, B, C, chunk_size)
    decay = torch.exp(segsum(log_a.transpose(1, 2))).to(C.dtype)  # (B, H, T, T)
    scores = C.transpose(1, 2) @ B.permute(0, 2, 3, 1)  # (B, H, T, N) @ (B, H, N, T) → (B, H, T, T)
    return scores * decay


def ssd_chunked(x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD: quadratic inside chunks of Q = ``chunk_size`` tokens, state passing between chunks.

    x: (B, T, H, P)   log_a: (B, T, H)   B, C: (B, T, H, N)   initial_state: (B, H, N, P) or None (zeros)
    → y: (B, T, H, P), final_state: (B, H, N, P) (the state after token T).

    T need not be a multiple of Q: the end is padded with a = 1 and B = C = x = 0, which changes neither
    the outputs nor the final state. Only batched matmuls; no Python loop over tokens or chunks.
    """
    batch, length, heads, _ = x.shape
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length

    def chunks(t: torch.Tensor) -> torch.Tensor:  # (B, T, H, ·) → (B, H, c, Q, ·)
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        return t.reshape(batch, n_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4).contiguous()

    x_c, B_c, C_c = chunks(x), chunks(B), chunks(C)  # (B, H, c, Q, P|N)
    log_a_c = chunks(log_a.unsqueeze(-1)).squeeze(-1)  # (B, H, c, Q)
    log_a_c = log_a_c.to(torch.promote_types(log_a.dtype, torch.float32))
    cum = torch.cumsum(log_a_c, dim=-1)  # (B, H, c, Q): log decay from the chunk start to each token

    # 1. Inside each chunk: y = (L ∘ C Bᵀ) x.
    L = torch.exp(segsum(log_a_c)).to(x.dtype)  # (B, H, c, Q, Q)
    y = ((C_c @ B_c.transpose(-1, -2)) * L) @ x_c  # (B, H, c, Q, P)

    # 2. Each chunk's own contribution to the state at its end: Σ_s exp(cum_last − cum_s) B_s x_sᵀ.
    to_end = torch.exp(cum[..., -1:] - cum).to(x.dtype)  # (B, H, c, Q)
    chunk_states = (B_c * to_end[..., None]).transpose(-1, -2) @ x_c  # (B, H, c, N, P)

    # 3. Between chunks: the state entering chunk z is Σ_{w < z} (decay from the end of chunk w to the start
    #    of chunk z) · state_w, the initial state counting as chunk −1; one matmul with a segsum over chunks.
    if initial_state is None:
        initial_state = x.new_zeros(batch, heads, B.shape[-1], x.shape[-1])
    chunk_states = torch.cat([initial_state.unsqueeze(2).to(x.dtype), chunk_states], dim=2)  # (B, H, c+1, N, P)
    chunk_log_a = F.pad(cum[..., -1], (1, 0))  # (B, H, c+1): whole-chunk log decays, 0 for the initial state
    between = torch.exp(segsum(chunk_log_a)).to(x.dtype)  # (B, H, c+1, c+1)
    states = (between @ chunk_states.flatten(-2)).view_as(chunk_states)  # (B, H, c+1, N, P)
    entering, final_state = states[:, :, :-1], states[:, :, -1]  # (B, H, c, N, P), (B, H, N, P)

    # 4. The entering state's contribution to each token: exp(cum_l) C_lᵀ S_in.
    y = y + (C_c @ entering) * torch.exp(cum).to(x.dtype)[..., None]  # (B, H, c, Q, P)

    y = y.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * chunk_size, heads, -1)[:, :length]
    return y, final_state


def ssd_step(x_t: torch.Tensor, log_a_t: torch.Tensor, B_t: torch.Tensor, C_t: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: S ← a S + B xᵀ, y = Cᵀ S.

    x_t: (B, H, P)   log_a_t: (B, H), or (B, H, N) for a decay per state dimension
    B_t, C_t: (B, H, N)   state: (B, H, N, P)   →   y_t: (B, H, P), new state: (B, H, N, P).
    """
    a_t = torch.exp(log_a_t).to(state.dtype)
    a_t = a_t[..., None] if log_a_t.dim() == 3 else a_t[..., None, None]  # (B, H, N, 1) or (B, H, 1, 1)
    state = a_t * state + B_t.unsqueeze(-1) * x_t.unsqueeze(-2)  # (B, H, N, P)
    y_t = (C_t.unsqueeze(-2) @ state).squeeze(-2)  # (B, H, 1, N) @ (B, H, N, P) → (B, H, P)
    return y_t, state


def ssd(x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
        initial_state: torch.Tensor | None = None, kernel: KernelChoice = "auto",
        library: Literal["mamba_ssm", "fla"] = "mamba_ssm") -> tuple[torch.Tensor, torch.Tensor]:
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
            return fla_simple.chunk_simple_gla(C, B, x, g=log_a, scale=1.0, initial_state=initial_state,
                                               output_final_state=True)
        return ssd_chunked(x, log_a, B, C, chunk_size, initial_state)
    mamba = kernel_module(kernel, "mamba_ssm.ops.triton.ssd_combined", "SSD", x)
    if mamba is None:
        return ssd_chunked(x, log_a, B, C, chunk_size, initial_state)
    dt = (-log_a).clamp(min=1e-6)  # (B, T, H): decay exp(dt · A) with A = −1; the kernel's input is dt · x
    y, final_state = mamba.mamba_chunk_scan_combined(
        x / dt.unsqueeze(-1).to(x.dtype), dt, -torch.ones(x.shape[2], device=x.device, dtype=torch.float32),
        B, C, chunk_size,
        initial_states=None if initial_state is None else initial_state.transpose(-1, -2).contiguous(),
        return_final_states=True)
    return y, final_state.transpose(-1, -2)  # the kernel's states are (B, H, P, N)
