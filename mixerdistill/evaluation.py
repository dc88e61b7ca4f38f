"""Held-out perplexity and greedy samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """exp(mean next-token NLL) over (N, T) windows, each scored independently (T − 1 predictions each)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        input_ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
        targets = input_ids[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                        device: torch.device) -> str:
    """The model's greedy continuation of ``prompt`` (text after the prompt only)."""
    model.eval()
    prompt_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    output = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                            max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True)
