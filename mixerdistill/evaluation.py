"""Held-out perplexity and greedy samples."""

from __future__ import annotations

import math

import torch
from torch import nn

from mixerdistill.logits import next_token_nll


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """exp(mean next-token NLL) over (N, T) windows, each scored independently (T − 1 predictions each);
    the logits are made a chunk of tokens at a time (``mixerdistill.logits``)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        input_ids = windows[start : start + batch_size].to(device)
        total_nll += next_token_nll(model, input_ids)
        total_tokens += input_ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def greedy_continuation(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, device: torch.device) -> str:
    """The model's greedy continuation of ``prompt`` (text after the prompt only)."""
    model.eval()
    prompt_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)
