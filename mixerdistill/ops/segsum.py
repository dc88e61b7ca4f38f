"""Segment sums of log decays: the exponent of every (i, j) entry of a decaying mixer's matrix."""

from __future__ import annotations

import torch


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """(..., T) → (..., T, T): out[i, j] = Σ_{k=j+1..i} log_a_k for j ≤ i, −inf above the diagonal.

    Cumsum differences, masked with −inf before any ``exp`` so nothing overflows and exp gives exact zeros.
    Computed in fp32 at least.
    """
    cumsum = torch.cumsum(log_a.to(torch.promote_types(log_a.dtype, torch.float32)), dim=-1)
    length = log_a.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=log_a.device).tril()
    return (cumsum[..., :, None] - cumsum[..., None, :]).masked_fill(~causal, float("-inf"))
