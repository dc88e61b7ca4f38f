"""Streaming generation: one token at a time through the model's cache, and text as the tokens come.

A student's cache holds one constant-size recurrent state per replaced layer (``MixerCacheLayer``) and
keys/values only for kept attention layers; a teacher's holds its KV cache. The prompt goes through the
model once (chunked mixer paths), then each new token is a single-token forward (the mixers' ``step``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

REPLACEMENT_CHARACTER = "\ufffd"  # what a decoder writes for the bytes of an unfinished UTF-8 character
DETOKENISER_CONTEXT = 4  # prompt tokens decoded ahead of the first new one (tokenizers that drop a leading space)


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 is greedy; otherwise softmax(logits / temperature),
    cut to the smallest set of tokens holding ``top_p`` of the probability (nucleus sampling)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def pick_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits → (B,) next tokens."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ranked, order = probabilities.sort(dim=-1, descending=True)
        outside = ranked.cumsum(-1) - ranked >= sampling.top_p  # the mass before a token already reaches top_p
        probabilities = probabilities.scatter(-1, order, ranked.masked_fill(outside, 0.0))
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def next_token_logits(model: nn.Module, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
    """(B, T) new tokens through ``model`` with ``cache`` (updated in place) → (B, V) logits of the last one."""
    return model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def stream_tokens(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = None,
    cache: Cache | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new (B,) token row for the (B, T) ``prompt_ids``: at most ``max_new_tokens``, stopping
    early once every row has produced ``eos_token_id``. ``cache`` (default: a new ``DynamicCache``) is
    filled as it goes; pass one to inspect it between tokens."""
    model.eval()
    cache = cache if cache is not None else DynamicCache(config=model.config)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(sampling.seed)
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    input_ids = prompt_ids
    for _ in range(max_new_tokens):
        tokens = pick_tokens(next_token_logits(model, input_ids, cache), sampling, generator)
        yield tokens
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
            if finished.all():
                return
        input_ids = tokens[:, None]


class TextStream:
    """Incremental detokenisation: ``push(token_id)`` returns the text that token completes.

    Decoding one token at a time breaks characters split across tokens (byte-level BPE splits multi-byte
    UTF-8 characters, a byte tokenizer emits one byte per token) and tokens whose text depends on the one
    before. So each push decodes a window starting a little before the unprinted tokens and returns what
    the new token adds to it, holding text back while it ends in an unfinished character.
    ``context``: the last prompt tokens, decoded for context but never returned.
    """

    def __init__(self, tokenizer, context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context or [])[-DETOKENISER_CONTEXT:]
        self.prefix_offset = 0  # where the decoded window starts
        self.read_offset = len(self.ids)  # tokens before this one are printed (or were context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; the new text it completes ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        printed = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(printed) or text.endswith(REPLACEMENT_CHARACTER):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(printed) :]

    def flush(self) -> str:
        """The text still held back at the end (an unfinished character comes out as U+FFFD)."""
        printed = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(printed) :]
