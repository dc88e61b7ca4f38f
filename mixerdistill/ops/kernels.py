"""Choosing between a fused CUDA kernel and the pure-PyTorch reference path.

Every operator in ``mixerdistill.ops`` has a reference path that runs anywhere. Some also have a fused
kernel from an optional GPU package (install the ``cuda`` extra):

  ssd (scalar decay)            mamba-ssm   ``mamba_chunk_scan_combined``   (discrete_mamba2, mamba2)
  ssd (scalar decay)            fla         ``chunk_simple_gla``           (linear / gated linear attention)
  diagonal-decay SSM            fla         ``chunk_gla``                  (gated linear attention, key-dim gates)
  gated delta rule              fla         ``chunk_gated_delta_rule``     (gated_delta_net)
  delta rule                    fla         ``chunk_delta_rule``           (delta_net)
  causal depthwise conv1d       causal-conv1d ``causal_conv1d_fn``

A mixer's Config carries ``kernel: auto | reference | cuda``. ``auto`` uses the kernel when the tensors
are on CUDA and the package imports, and otherwise the reference path with a one-time notice on stderr;
``cuda`` insists (a clear error where it cannot be honoured); ``reference`` never uses a kernel. The GPU
packages are imported only here, lazily, on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Literal

import torch

from mixerdistill.errors import UserError

KernelChoice = Literal["auto", "reference", "cuda"]
KERNEL_HELP = (
    "auto: the fused CUDA kernel when the tensors are on CUDA and its package is installed (extra "
    "'cuda'), else the PyTorch reference path; reference: always the reference; cuda: the kernel or an error"
)

PACKAGES = {"mamba_ssm": "mamba-ssm", "fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}
_imported: dict[str, object | None] = {}
_noticed: set[tuple[str, str]] = set()


def _import(module: str):
    """The module, or None when it (or one of its own imports) is missing; cached."""
    if module not in _imported:
        try:
            _imported[module] = importlib.import_module(module)
        except Exception:  # GPU packages fail in many ways on machines without CUDA
            _imported[module] = None
    return _imported[module]


def notice_once(operator: str, reason: str) -> None:
    """Print, once per (operator, reason) per process, that the reference path is used (rank 0 only).

    Plain ``print`` and the ``RANK`` variable rather than mixerdistill's console and process helpers: this
    module also runs inside exported models, which have only torch and transformers.
    """
    if (operator, reason) in _noticed or os.environ.get("RANK", "0") != "0":
        return
    _noticed.add((operator, reason))
    print(f"mixerdistill: {operator} runs its PyTorch reference path ({reason})", file=sys.stderr)


def kernel_module(choice: KernelChoice, module: str, operator: str, tensor: torch.Tensor):
    """The imported kernel module to use for ``operator`` on ``tensor``, or None for the reference path.

    ``module`` is the import path of the kernel's module, e.g. ``"fla.ops.gla"`` (its top-level package
    is a key of ``PACKAGES``).
    Raises UserError when ``choice`` is 'cuda' and the kernel cannot run.
    """
    if choice == "reference":
        return None
    if not tensor.is_cuda:
        reason = f"tensors on {tensor.device.type}, the fused kernel needs CUDA"
    elif _import(module) is None:
        reason = f"{PACKAGES[module.split('.')[0]]} is not installed; pip install 'mixerdistill[cuda]'"
    else:
        return _imported[module]
    if choice == "cuda":
        raise UserError(f"kernel: cuda was asked for {operator}, but {reason}")
    notice_once(operator, reason)
    return None
