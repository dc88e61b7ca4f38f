"""Student construction: a copy of the teacher whose attention modules are swapped for sequence mixers.

The student stays the teacher's transformers class (``forward``, ``generate`` and ``save_pretrained``
keep working). Each replaced attention module becomes a ``MixerLayer``, which speaks the family's
attention call convention and keeps the mixer's recurrent state in the generation cache as a
``MixerCacheLayer`` (constant size: no per-token placeholder).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from mixerdistill.mixer import SequenceMixer, State
from mixerdistill.teacher import TeacherAdapter

ATTENTION = "attention"  # what `student.mixers` counts a kept teacher attention layer as


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


class MixerLayer(nn.Module):
    """Sits where a teacher attention module was; calls ``mixer`` with the teacher's inputs.

    Called as ``forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kw)``
    (the cache also under its older names ``past_key_values`` and GPT-NeoX's ``layer_past``) and returns
    ``(output, None)`` like a transformers attention module. With a cache (``generate``),
    the mixer state lives in the cache as a ``MixerCacheLayer``; a single new token goes through the
    mixer's recurrent ``step``, longer inputs (the prompt) through its chunked ``forward``.
    """

    def __init__(self, mixer: SequenceMixer, layer_idx: int):
        super().__init__()
        self.mixer = mixer
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, layer_past=None, **kwargs):
        cache = next((c for c in (cache, past_key_values, layer_past) if c is not None), None)
        if cache is None:
            output, _ = self.mixer(hidden_states, rotary=position_embeddings)
            return output, None
        entry = mixer_cache_layer(cache, self.layer_idx)
        batch, length = hidden_states.shape[:2]
        if length == 1:
            state = entry.state
            if state is None:
                state = self.mixer.init_state(batch, device=hidden_states.device, dtype=hidden_states.dtype)
            rotary = None if position_embeddings is None else tuple(t[:, 0] for t in position_embeddings)
            output, entry.state = self.mixer.step(hidden_states[:, 0], state, rotary=rotary)
            output = output.unsqueeze(1)
        else:
            output, entry.state = self.mixer(hidden_states, state=entry.state, rotary=position_embeddings)
        entry.seen += length
        return output, None


@dataclass
class StudentSpec:
    """How to rebuild a student from its teacher: stored as ``student.json`` beside the weights."""

    mixer: str
    mixer_config: dict[str, Any]
    keep_attention: list[int] = field(default_factory=list)
    adapter: str = ""
    teacher: dict[str, Any] = field(default_factory=dict)  # the recipe's teacher block
    teacher_config: dict[str, Any] = field(default_factory=dict)  # transformers config.to_dict()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_file(cls, path: Path) -> StudentSpec:
        return cls(**json.loads(Path(path).read_text()))


def build_student(teacher: nn.Module, adapter: TeacherAdapter, mixer_cls: type[SequenceMixer],
                  mixer_config, keep_attention: list[int], transfer: bool = True) -> nn.Module:
    """A deep copy of ``teacher`` with every layer not in ``keep_attention`` using ``mixer_cls``.

    First the transfer check (``mixerdistill.transfer_check``): the adapter's view of every layer to be
    replaced must reproduce the teacher's layer, or a ``TransferMismatch`` names the layer and the piece.
    With ``transfer`` the mixer is built by ``mixer_cls.from_attention`` from the teacher's q/k/v/o;
    otherwise it starts from the mixer's own initialisation.
    """
    from mixerdistill.transfer_check import check_transfer, teacher_layers

    count = len(teacher_layers(teacher, adapter))
    bad = [i for i in keep_attention if not 0 <= i < count]
    if bad:
        from mixerdistill.errors import UserError

        raise UserError(f"keep_attention {bad} out of range: the teacher has {count} layers")
    check_transfer(teacher, adapter, set(range(count)) - set(keep_attention))
    student = copy.deepcopy(teacher)
    layers = adapter.layers(student)
    for idx, layer in enumerate(layers):
        if idx in keep_attention:
            continue
        geometry = adapter.geometry(student.config, idx)
        attention = adapter.attention(layer)
        if transfer:
            mixer = mixer_cls.from_attention(adapter.attention_weights(attention), geometry, mixer_config)
        else:
            mixer = mixer_cls(geometry, mixer_config)
        reference = next(attention.parameters())
        mixer.to(device=reference.device, dtype=reference.dtype)
        adapter.set_attention(layer, MixerLayer(mixer, idx))
    return student


def mixer_layers(student: nn.Module, adapter: TeacherAdapter) -> dict[int, SequenceMixer]:
    """{layer index: mixer} for every replaced layer."""
    found = {}
    for idx, layer in enumerate(adapter.layers(student)):
        module = adapter.attention(layer)
        if isinstance(module, MixerLayer):
            found[idx] = module.mixer
    return found


def mixer_counts(student: nn.Module, adapter: TeacherAdapter, mixer_name: str) -> dict[str, int]:
    """How many layers use each mixer, kept attention counted as 'attention'."""
    counts: Counter = Counter()
    replaced = mixer_layers(student, adapter)
    for idx in range(len(adapter.layers(student))):
        counts[mixer_name if idx in replaced else ATTENTION] += 1
    return dict(counts)
