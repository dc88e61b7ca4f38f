"""A mixer in a teacher's place: the attention-shaped module that calls a ``SequenceMixer``, and its cache entry.

``MixerLayer`` speaks a transformers attention module's call convention and keeps the mixer's recurrent state
in the generation cache as a ``MixerCacheLayer`` (constant size: no per-token placeholder). This module needs
only torch and transformers: it is also the core of an exported model (``mixerdistill export``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from mixerdistill.mixer import RotaryEmbedding, SequenceMixer, State


class MixerCacheLayer(CacheLayerMixin):
    """A replaced layer's entry in a transformers ``Cache``: the mixer's recurrent state and a token count.

    Its size does not depend on the tokens seen (unless the mixer's ``state_grows``, as softmax attention's
    does). ``get_seq_length`` and ``get_mask_sizes`` answer like a KV layer holding ``seen`` tokens, so
    positions and the masks of kept attention layers come out right whichever layer the cache asks.
    """

    is_croppable = False  # a recurrent state cannot be rolled back
    supports_early_init = False  # holds no keys or values to pre-allocate

    def __init__(self, state: State | None = None, seen: int = 0):
        super().__init__()
        self.state = state
        self.seen = seen

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise TypeError("a mixer layer's cache holds a recurrent state, not keys and values")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise TypeError("a mixer layer's cache holds a recurrent state, not keys and values")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def _map_state(self, change) -> None:
        if self.state is not None:
            self.state = {name: change(tensor) for name, tensor in self.state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda tensor: tensor[indices])


def mixer_cache_layer(cache: Cache, layer_idx: int) -> MixerCacheLayer:
    """Layer ``layer_idx``'s ``MixerCacheLayer`` in ``cache``, put in place of the empty KV layer that
    ``DynamicCache`` made for it (or appended, for a cache that creates its layers lazily)."""
    while len(cache.layers) <= layer_idx:
        cache.layers.append(cache.layer_class_to_replicate() if cache.layer_class_to_replicate else DynamicLayer())
    entry = cache.layers[layer_idx]
    if not isinstance(entry, MixerCacheLayer):
        if entry.get_seq_length() > 0:
            raise RuntimeError(f"layer {layer_idx}: the cache holds keys and values where a mixer state belongs")
        entry = cache.layers[layer_idx] = MixerCacheLayer()
    return entry


def cache_tensor_bytes(cache: Cache) -> dict[str, int]:
    """Bytes of the tensors a cache holds: {"kv": keys and values of attention layers, "state": mixer states}."""
    sizes = {"kv": 0, "state": 0}
    for entry in cache.layers:
        if isinstance(entry, MixerCacheLayer):
            sizes["state"] += sum(t.nbytes for t in (entry.state or {}).values())
        elif entry.get_seq_length() > 0:
            sizes["kv"] += entry.keys.nbytes + entry.values.nbytes
    return sizes


def left_padding(attention_mask, length: int) -> torch.Tensor | None:
    """(B,) count of padding tokens at the start of each row's last ``length`` positions, or None when no row
    is padded there or the padding is not all at the start (right padding leaves a causal model's outputs
    for the real tokens unchanged).

    ``attention_mask`` is what a transformers decoder hands its attention modules: None, a 2-D (B, T_k)
    padding mask (1 = real token), or a 4-D (B, 1, T_q, T_k) causal mask, bool (True = attend) or additive
    float (0 = attend). In a 4-D mask a real token attends to itself and to no later token; a padding token's
    row is either fully masked or (transformers' fix for fully masked rows) fully open. A sliding window masks
    old keys in late rows, never a token's own key, so it is not taken for padding. Other kinds give None.
    """
    if not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        real = attention_mask[:, -length:].bool()
    elif attention_mask.dim() == 4:
        square = attention_mask[:, 0, -length:, -length:]  # each new token's row over the new tokens' keys
        attends = square if square.dtype == torch.bool else square == 0
        sees_itself = attends.diagonal(dim1=-2, dim2=-1)  # (B, length)
        sees_next = torch.zeros_like(sees_itself)
        sees_next[:, :-1] = attends.diagonal(offset=1, dim1=-2, dim2=-1)
        real = sees_itself & ~sees_next
    else:
        return None
    if real.all():
        return None
    pads = (~real).long().cumprod(-1).sum(-1)  # leading padding tokens per row
    return pads if torch.equal(real.sum(-1) + pads, torch.full_like(pads, length)) else None


class MixerLayer(nn.Module):
    """Sits where a teacher attention module was; calls ``mixer`` with the teacher's inputs.

    Called as ``forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kw)``
    (the cache also under its older names ``past_key_values`` and GPT-NeoX's ``layer_past``) and returns
    ``(output, None)`` like a transformers attention module. With a cache (``generate``),
    the mixer state lives in the cache as a ``MixerCacheLayer``; a single new token goes through the
    mixer's recurrent ``step``, longer inputs (the prompt) through its chunked ``forward``.

    Left padding (a batch of prompts of different lengths): each row goes through the mixer from its first
    real token, so its outputs and state are those of the prompt alone; padding positions output zeros.
    """

    def __init__(self, mixer: SequenceMixer, layer_idx: int):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        layer_past=None,
        **kwargs,
    ):
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        entry = None if cache is None else mixer_cache_layer(cache, self.layer_idx)
        state = None if entry is None else entry.state
        batch, length = hidden_states.shape[:2]
        if entry is not None and length == 1:  # decoding: the new token is never padding
            if state is None:
                state = self.mixer.init_state(batch, device=hidden_states.device, dtype=hidden_states.dtype)
            rotary = None if position_embeddings is None else tuple(t[:, 0] for t in position_embeddings)
            output, state = self.mixer.step(hidden_states[:, 0], state, rotary=rotary)
            output = output.unsqueeze(1)
        else:
            pads = left_padding(attention_mask, length)
            if pads is None:
                output, state = self.mixer(hidden_states, state=state, rotary=position_embeddings)
            else:
                output, state = self._forward_left_padded(hidden_states, state, position_embeddings, pads)
        if entry is not None:
            entry.state = state
            entry.seen += length
        return output, None

    def _forward_left_padded(
        self, hidden_states: torch.Tensor, state: State | None, rotary: RotaryEmbedding, pads: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) with ``pads`` (B,) leading padding tokens per row → (B, T, D) and the state: the rows
        sharing a padding length go through the mixer together, from their first real token."""
        if self.mixer.state_grows:
            raise ValueError(
                f"layer {self.layer_idx}: a left-padded batch needs a mixer with a constant-size "
                f"state; {type(self.mixer).__name__}'s grows with the tokens"
            )
        batch, length = hidden_states.shape[:2]
        output = torch.zeros_like(hidden_states)
        pieces = []
        for pad in pads.unique().tolist():  # one host sync per forward
            rows = (pads == pad).nonzero().squeeze(-1)
            row_state = None if state is None else {name: tensor[rows] for name, tensor in state.items()}
            if pad == length:  # nothing real yet: the state stays as it was
                if row_state is None:
                    row_state = self.mixer.init_state(len(rows), device=hidden_states.device, dtype=hidden_states.dtype)
                pieces.append((rows, row_state))
                continue
            row_rotary = (
                None if rotary is None else tuple((t[rows] if t.shape[0] == batch else t)[:, pad:] for t in rotary)
            )
            output[rows, pad:], row_state = self.mixer(hidden_states[rows, pad:], state=row_state, rotary=row_rotary)
            pieces.append((rows, row_state))
        merged = {name: tensor.new_empty((batch, *tensor.shape[1:])) for name, tensor in pieces[0][1].items()}
        for rows, row_state in pieces:
            for name, tensor in row_state.items():
                merged[name][rows] = tensor
        return output, merged
