"""The device a run computes on."""

from __future__ import annotations

import torch

from mixerdistill.errors import UserError


def pick_device(requested: str) -> torch.device:
    """The recipe's ``device``: 'auto' is CUDA when available, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{requested}' requested but CUDA is not available")
    return torch.device(requested)
