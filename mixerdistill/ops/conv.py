"""Causal depthwise conv1d over (B, C, T) with a carried state, in plain PyTorch (kernel: causal-conv1d).

The state is the last K − 1 pre-conv inputs (B, C, K − 1), K the kernel width, so a sequence can be split
anywhere (chunked prefill, one-token decoding) and give the same outputs as one pass.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mixerdistill.ops.kernels import KernelChoice, kernel_module

Activation = Literal["identity", "silu"]


def _activate(y: torch.Tensor, activation: Activation) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None = None,
    activation: Activation = "identity",
    kernel: KernelChoice = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T), weight (C, 1, K) as ``nn.Conv1d(groups=C)`` holds it, bias (C,) or None,
    state (B, C, K − 1) or None (zeros) → activation(conv) (B, C, T) and the new state (B, C, K − 1).

    The fused kernel is used only without an incoming state (training and prefill from empty).
    """
    batch, channels, length = x.shape
    keep = weight.shape[-1] - 1
    if state is None:
        state = x.new_zeros(batch, channels, keep)
        module = kernel_module(kernel, "causal_conv1d", "causal conv1d", x)
    else:
        module = None
    seen = torch.cat([state, x], dim=-1)  # (B, C, K − 1 + T)
    new_state = seen[..., seen.shape[-1] - keep :]
    if module is not None:
        y = module.causal_conv1d_fn(x, weight.squeeze(1), bias, activation=None if activation == "identity" else "silu")
        return y, new_state
    y = F.conv1d(seen, weight, bias, groups=channels)  # (B, C, T)
    return _activate(y, activation), new_state


def causal_conv1d_step(
    x_t: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    activation: Activation = "identity",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x_t (B, C), state (B, C, K − 1) → output (B, C), new state (B, C, K − 1)."""
    window = torch.cat([state, x_t.unsqueeze(-1)], dim=-1)  # (B, C, K)
    y = (window * weight.squeeze(1)).sum(-1)
    if bias is not None:
        y = y + bias
    return _activate(y, activation), window[..., 1:]
