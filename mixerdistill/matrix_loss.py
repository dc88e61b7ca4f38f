"""Stage 1's distance between mixing matrices, and how it is computed (whole or in row blocks).

Core code: the stage-1 plugin, the ablation and the benchmarks all measure with ``matrix_distance``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from mixerdistill.mixer import MatrixRows

MatrixLoss = Literal["auto", "blockwise", "materialised"]
BLOCKWISE_FROM = 1024  # seq_len from which the blockwise loss is also the faster one (docs/performance.md)
MATERIALISED_BUFFERS = 6  # (B, H, T, T) fp32 buffers per layer the materialised loss holds for its backward
MATERIALISED_LIMIT = 4 * 2**30  # bytes: above this the materialised matrices of a step are not worth holding


def choose_matrix_loss(requested: MatrixLoss, batch_size: int, seq_len: int, heads: int) -> MatrixLoss:
    """What ``auto`` means for a step of (``batch_size``, ``seq_len``) over ``heads`` heads in all replaced
    layers: blockwise from ``BLOCKWISE_FROM`` tokens or when the materialised buffers would exceed
    ``MATERIALISED_LIMIT``, else materialised. Shapes only — never the machine's state — so every rank and
    every machine, and a resumed run, take the same path."""
    if requested != "auto":
        return requested
    materialised_bytes = MATERIALISED_BUFFERS * batch_size * heads * seq_len**2 * 4
    return "blockwise" if seq_len >= BLOCKWISE_FROM or materialised_bytes > MATERIALISED_LIMIT else "materialised"


def matrix_distance(
    student: MatrixRows, teacher: MatrixRows, length: int, block_rows: int | None = None, sink_tokens: int = 0
) -> torch.Tensor:
    """‖M_student − A_teacher‖_F per (batch, head): (B, H), from two ``MatrixRows`` over T = ``length`` tokens.

    ``block_rows`` None: both (B, H, T, T) matrices at once. Otherwise blocks of that many query rows, each
    under activation checkpointing: its (B, H, r, ≤T) tensors are freed after the forward and rebuilt one
    block at a time in the backward, so memory is O(r·T) instead of O(T²) for the same loss and gradients.
    The first ``sink_tokens`` columns of the teacher's matrix are zeroed (attention sinks).
    """

    def squared(start: int, stop: int) -> torch.Tensor:  # (B, H): Σ over the block of (M − A)²
        with torch.no_grad():
            target = teacher(start, stop)
            target[..., :sink_tokens] = 0
        return (student(start, stop) - target).square().sum((-1, -2))

    if block_rows is None or block_rows >= length:
        return squared(0, length).sqrt()
    total = sum(
        checkpoint(squared, start, min(start + block_rows, length), use_reentrant=False)
        for start in range(0, length, block_rows)
    )
    return total.sqrt()
