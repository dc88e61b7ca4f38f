"""Student construction: a copy of the teacher whose attention modules are swapped for sequence mixers.

The student stays the teacher's transformers class (``forward``, ``generate`` and ``save_pretrained``
keep working). Each replaced attention module becomes a ``MixerLayer`` (``mixerdistill.mixer_layer``), which
speaks the family's attention call convention and keeps the mixer's recurrent state in the generation cache.

Everything the student keeps from the teacher (embeddings, MLPs, norms, kept attention) starts on the
teacher's own storage: a separate ``nn.Parameter`` over the same tensor, so a part no stage trains costs no
memory twice (SmolLM2's MLPs and embeddings: 0.43 GB; Gemma 3's embedding alone: 0.67 GB). The training loop
gives a parameter a copy of its own (``own_storage``) before it learns, and checkpoints are loaded by
rebinding tensors (``mixerdistill.checkpoint.assign_weights``), never by writing into the shared ones.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mixerdistill.mixer import SequenceMixer
from mixerdistill.mixer_layer import (
    MixerCacheLayer,
    MixerLayer,
    cache_tensor_bytes,
    mixer_cache_layer,
)
from mixerdistill.teacher import TeacherAdapter

__all__ = [
    "ATTENTION",
    "MixerCacheLayer",
    "MixerLayer",
    "StudentSpec",
    "build_student",
    "cache_tensor_bytes",
    "mixer_cache_layer",
    "mixer_counts",
    "mixer_layers",
    "own_storage",
]

ATTENTION = "attention"  # what `student.mixers` counts a kept teacher attention layer as


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


def build_student(
    teacher: nn.Module,
    adapter: TeacherAdapter,
    mixer_cls: type[SequenceMixer],
    mixer_config,
    keep_attention: list[int],
    transfer: bool = True,
) -> nn.Module:
    """A copy of ``teacher`` with every layer not in ``keep_attention`` using ``mixer_cls``; what it keeps
    from the teacher shares the teacher's storage (module docstring), the mixers own theirs.

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
    student = _copy_on_shared_storage(teacher)
    layers = adapter.layers(student)
    mixers = []
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
        mixers.append(mixer)
        adapter.set_attention(layer, MixerLayer(mixer, idx))
    own_storage((p for mixer in mixers for p in mixer.parameters()), teacher)  # transfers may take views of q/k/v/o
    return student


def _copy_on_shared_storage(teacher: nn.Module) -> nn.Module:
    """A deep copy of ``teacher`` whose parameters are new ``nn.Parameter`` objects over the teacher's tensors
    (tied parameters stay tied); buffers and everything else are copied."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in teacher.parameters()}
    return copy.deepcopy(teacher, memo)


def own_storage(parameters: Iterable[nn.Parameter], teacher: nn.Module) -> None:
    """Give each of ``parameters`` that still lies on ``teacher``'s storage (or a view of it) a copy of its
    own, so that training it leaves the teacher as it is."""
    shared = {p.untyped_storage().data_ptr() for p in teacher.parameters() if p.numel()}
    for p in parameters:
        if p.numel() and p.untyped_storage().data_ptr() in shared:
            p.data = p.data.clone()


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
