"""The transfer check: an adapter's view of each replaced teacher layer must reproduce that layer.

Before a student is built, every layer that will be replaced is rebuilt as the ``attention`` mixer from
the adapter's view (projections, q/k norms, rotary, scale, soft-capping, window) and run on the inputs the
teacher's own forward gave that layer on a short random probe. Its output must equal the teacher
attention's. A wrong or incomplete adapter (``teacher.adapter`` forced onto another family, a family
option the adapter ignores) therefore stops the run with an error that names the layer, the family and
the first piece that differs, instead of producing a quietly broken student.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mixerdistill.errors import UserError
from mixerdistill.mixer import AttentionWeights
from mixerdistill.teacher import TeacherAdapter, find_adapter, trace_teacher

PROBE_TOKENS = 32  # plus the longest sliding window, so windows are crossed
MAX_PROBE_TOKENS = 1024
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative error of the attention output
LOW_PRECISION_TOLERANCE = 2e-2


class TransferMismatch(UserError):
    """The adapter's view of a teacher layer does not compute what the layer computes."""


def teacher_layers(teacher: nn.Module, adapter: TeacherAdapter) -> nn.ModuleList:
    """The adapter's decoder blocks of ``teacher``; a ``TransferMismatch`` when the adapter cannot find them."""
    try:
        return adapter.layers(teacher)
    except AttributeError as error:
        raise _mismatch(teacher, adapter, None, "the decoder layers", str(error)) from None


def check_transfer(teacher: nn.Module, adapter: TeacherAdapter, layers: Iterable[int], seed: int = 0) -> None:
    """Raise ``TransferMismatch`` unless the adapter's view of every layer in ``layers`` reproduces the
    teacher's attention output on a probe of random tokens (run with eager attention, so the teacher's
    attention probabilities can be compared when the outputs differ)."""
    layers = sorted(layers)
    if not layers:
        return
    blocks = teacher_layers(teacher, adapter)
    try:
        geometries = {idx: adapter.geometry(teacher.config, idx) for idx in layers}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise _mismatch(
            teacher, adapter, layers[0], "the attention geometry (config)", f"{type(error).__name__}: {error}"
        ) from None
    windows = [g.sliding_window for g in geometries.values() if g.sliding_window is not None]
    length = min(MAX_PROBE_TOKENS, PROBE_TOKENS + max(windows, default=0))
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randint(0, teacher.config.vocab_size, (1, length), generator=generator)
    device = next(teacher.parameters()).device
    probabilities: dict[int, torch.Tensor] = {}
    handles = []
    for idx in layers:

        def keep_probabilities(module, args, output, _idx=idx):
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                probabilities[_idx] = output[1].detach()

        try:
            attention = adapter.attention(blocks[idx])
        except AttributeError as error:
            raise _mismatch(teacher, adapter, idx, "the attention module", str(error)) from None
        handles.append(attention.register_forward_hook(keep_probabilities))
    implementation = teacher.config._attn_implementation
    teacher.config._attn_implementation = "eager"
    try:
        trace = trace_teacher(
            teacher, adapter, probe.to(device), record={"mixer_inputs", "mixer_outputs"}, layers=set(layers)
        )
    finally:
        teacher.config._attn_implementation = implementation
        for handle in handles:
            handle.remove()
    for idx in layers:
        _check_layer(
            teacher,
            adapter,
            idx,
            trace.mixer_inputs[idx],
            trace.rotary(idx),
            trace.mixer_outputs[idx],
            probabilities.get(idx),
        )


@torch.no_grad()
def _check_layer(teacher, adapter, idx, inputs, rotary, expected, teacher_probabilities) -> None:
    """One layer: the adapter's view on the teacher layer's own input must give the teacher layer's output."""
    from mixerdistill.stages import teacher_attention_mixer

    attention = adapter.attention(adapter.layers(teacher)[idx])
    try:
        mixer = teacher_attention_mixer(teacher, adapter, idx)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise _mismatch(teacher, adapter, idx, "reading the projections", f"{type(error).__name__}: {error}") from None
    try:
        output, _ = mixer(inputs, rotary=rotary)
    except (RuntimeError, ValueError) as error:
        raise _mismatch(
            teacher, adapter, idx, "running the adapter's view", f"{type(error).__name__}: {error}"
        ) from None
    error = relative_error(output, expected)
    if error <= TOLERANCE.get(expected.dtype, LOW_PRECISION_TOLERANCE):
        return
    unread = unread_parameters(attention, adapter.attention_weights(attention))
    summary = f"the attention output differs by {error:.2g} (relative)"
    if unread:
        raise _mismatch(
            teacher,
            adapter,
            idx,
            "projections and norms",
            f"the teacher's attention has parameters the adapter does not read: {', '.join(unread)}; {summary}",
        )
    g = mixer.geometry
    if teacher_probabilities is not None:
        probability_error = relative_error(mixer.mixing_matrix(inputs, rotary), teacher_probabilities)
        if probability_error > TOLERANCE.get(expected.dtype, LOW_PRECISION_TOLERANCE):
            raise _mismatch(
                teacher,
                adapter,
                idx,
                "attention probabilities (q/k norms, RoPE, softmax scale, soft-capping or window)",
                f"they differ by {probability_error:.2g} (relative); the adapter's view: "
                f"qk_norm={g.qk_norm}, rotary_dim={g.rotary_dim}, interleaved={g.rotary_interleaved}, "
                f"scale={g.scale:.4g}, softcap={g.logit_softcap}, window={g.sliding_window}; {summary}",
            )
        raise _mismatch(
            teacher, adapter, idx, "values or output projection", f"the attention probabilities agree; {summary}"
        )
    raise _mismatch(teacher, adapter, idx, "attention output", summary)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp32 (inf for a shape mismatch)."""
    if actual.shape != expected.shape:
        return float("inf")
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def unread_parameters(attention: nn.Module, weights: AttentionWeights) -> list[str]:
    """Names of ``attention``'s parameters whose storage none of ``weights``' tensors shares."""
    read = {t.untyped_storage().data_ptr() for t in vars(weights).values() if isinstance(t, torch.Tensor)}
    return [
        name for name, parameter in attention.named_parameters() if parameter.untyped_storage().data_ptr() not in read
    ]


def _mismatch(teacher, adapter, idx: int | None, piece: str, detail: str) -> TransferMismatch:
    """The error for layer ``idx`` (None: the whole model): which adapter, which family, which piece, and
    what to do."""
    model_type = getattr(teacher.config, "model_type", "?")
    try:
        suggestion = f"the adapter for model_type '{model_type}' is '{find_adapter(teacher.config).name}'"
    except UserError:
        suggestion = f"no installed adapter declares model_type '{model_type}'"
    return TransferMismatch(
        f"teacher adapter '{adapter.name}' does not reproduce {'the layers' if idx is None else f'layer {idx}'} "
        f"of this {model_type} teacher "
        f"({type(teacher).__name__}): first differing piece: {piece}: {detail}. "
        f"Set teacher.adapter to an adapter for this family or leave it unset ({suggestion})."
    )
