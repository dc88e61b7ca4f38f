"""check_mixer has no blind spots: planted bugs that the old check let through are caught, each with a message
naming the method that is most likely wrong; a correct chunked mixer passes at every length it is given."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field
from torch import nn

from mixerdistill.mixer import (
    MixerConfig,
    SequenceMixer,
    copy_projection,
    repeat_kv_rows,
)
from mixerdistill.testing import check_mixer


class ChunkedLinearAttention(SequenceMixer):
    """y_i = Σ_{j ≤ i} (q_i · k_j) v_j per head, computed chunk by chunk; state S = Σ_j k_j v_jᵀ (B, H, d, d)."""

    class Config(MixerConfig):
        chunk_size: int = Field(64, ge=1, description="tokens per chunk of forward")

    def __init__(self, geometry, config=None):
        super().__init__(geometry, config if config is not None else self.Config())
        g, width = geometry, geometry.num_heads * geometry.head_dim
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(g.hidden_size, width, bias=g.attention_bias) for _ in range(3)
        )
        self.o_proj = nn.Linear(width, g.hidden_size, bias=g.output_bias)

    def _qkv(self, hidden_states):
        """(B, T, D) → q, k, v (B, H, T, d)."""
        shape = (*hidden_states.shape[:-1], self.geometry.num_heads, self.geometry.head_dim)
        return [proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)]

    def _output(self, y):
        """(B, H, T, d) → (B, T, D)."""
        return self.o_proj(y.transpose(1, 2).flatten(-2))

    @staticmethod
    def _chunk(q, k, v, S):
        """One chunk (B, H, Q, d) on top of the state S → (output (B, H, Q, d), the state after it)."""
        return (q @ k.transpose(-1, -2)).tril() @ v + q @ S, S + k.transpose(-1, -2) @ v

    def forward(self, hidden_states, state=None, rotary=None):
        q, k, v = self._qkv(hidden_states)
        S = (state or self.init_state(q.shape[0], q.device, q.dtype))["S"]
        outputs = []
        for start in range(0, q.shape[2], self.config.chunk_size):
            piece = slice(start, start + self.config.chunk_size)
            y, S = self._chunk(q[:, :, piece], k[:, :, piece], v[:, :, piece], S)
            outputs.append(y)
        return self._output(torch.cat(outputs, dim=2)), {"S": S}

    def mixing_matrix(self, hidden_states, rotary=None):
        q, k, _ = self._qkv(hidden_states)
        return (q @ k.transpose(-1, -2)).tril()

    def materialised_forward(self, hidden_states, rotary=None):
        return self._output(self.mixing_matrix(hidden_states) @ self._qkv(hidden_states)[2])

    def matrix_parameters(self):
        return [*self.q_proj.parameters(), *self.k_proj.parameters()]

    def init_state(self, batch_size, device=None, dtype=None):
        g, reference = self.geometry, self.q_proj.weight
        return {
            "S": torch.zeros(
                batch_size,
                g.num_heads,
                g.head_dim,
                g.head_dim,
                device=device or reference.device,
                dtype=dtype or reference.dtype,
            )
        }

    def step(self, hidden_state, state, rotary=None):
        output, state = self(hidden_state.unsqueeze(1), state)
        return output.squeeze(1), state

    @classmethod
    def from_attention(cls, weights, geometry, config=None):
        mixer = cls(geometry, config)
        copy_projection(mixer.q_proj, weights.q, weights.q_bias)
        for linear, weight, bias in (
            (mixer.k_proj, weights.k, weights.k_bias),
            (mixer.v_proj, weights.v, weights.v_bias),
        ):
            copy_projection(
                linear, repeat_kv_rows(geometry, weight), None if bias is None else repeat_kv_rows(geometry, bias)
            )
        copy_projection(mixer.o_proj, weights.o, weights.o_bias)
        return mixer


def test_a_correct_chunked_mixer_passes_across_chunk_boundaries_and_transfers():
    report = check_mixer(ChunkedLinearAttention)
    assert report.lengths == [19, 63, 64, 65, 129]
    assert "T=129: forward vs step" in report.errors
    assert set(report.transfers.values()) == {"checked"} and len(report.transfers) == 4
    assert "from_attention(attention_bias=True, output_bias=True): forward vs step" in report.errors


class SignErrorHiddenByADirectPath(ChunkedLinearAttention):
    """mixing_matrix is negated; materialised_forward computes its output without it (the old blind spot)."""

    def mixing_matrix(self, hidden_states, rotary=None):
        return -super().mixing_matrix(hidden_states)

    def materialised_forward(self, hidden_states, rotary=None):
        q, k, v = self._qkv(hidden_states)
        return self._output((q @ k.transpose(-1, -2)).tril() @ v)


class SignErrorThroughTheMatrix(SignErrorHiddenByADirectPath):
    materialised_forward = ChunkedLinearAttention.materialised_forward


class CallsButIgnoresTheMatrix(SignErrorHiddenByADirectPath):
    def materialised_forward(self, hidden_states, rotary=None):
        self.mixing_matrix(hidden_states)
        return super().materialised_forward(hidden_states)


class RunningStateIgnoredBetweenChunks(ChunkedLinearAttention):
    """forward starts every chunk from the initial state instead of the running one: wrong only past a chunk."""

    def forward(self, hidden_states, state=None, rotary=None):
        q, k, v = self._qkv(hidden_states)
        initial = (state or self.init_state(q.shape[0], q.device, q.dtype))["S"]
        S, outputs = initial, []
        for start in range(0, q.shape[2], self.config.chunk_size):
            piece = slice(start, start + self.config.chunk_size)
            y, _ = self._chunk(q[:, :, piece], k[:, :, piece], v[:, :, piece], initial)
            S = S + k[:, :, piece].transpose(-1, -2) @ v[:, :, piece]
            outputs.append(y)
        return self._output(torch.cat(outputs, dim=2)), {"S": S}


class KeyBiasOfTheWrongShape(ChunkedLinearAttention):
    """from_attention repeats the k bias as if it were a matrix: (H·d, 1) instead of (H·d,)."""

    @classmethod
    def from_attention(cls, weights, geometry, config=None):
        mixer = super().from_attention(weights, geometry, config)
        if weights.k_bias is not None:
            mixer.k_proj.bias = nn.Parameter(repeat_kv_rows(geometry, weights.k_bias[:, None]))
        return mixer


class BrokenStep(ChunkedLinearAttention):
    def step(self, hidden_state, state, rotary=None):
        output, state = super().step(hidden_state, state)
        return output * 1.01, state


PLANTED = [
    (SignErrorHiddenByADirectPath, "materialised_forward does not call mixing_matrix"),
    (CallsButIgnoresTheMatrix, r"materialised_forward does not use the matrix mixing_matrix returns"),
    (SignErrorThroughTheMatrix, r"mixing_matrix \(or materialised_forward\) is likely wrong: forward and step agree"),
    (
        RunningStateIgnoredBetweenChunks,
        (
            r"T=65: .*forward is likely wrong: materialised_forward and step agree "
            r"\(T = 65 crosses a chunk boundary"
        ),
    ),
    (
        KeyBiasOfTheWrongShape,
        (
            r"from_attention\(attention_bias=True, output_bias=False\) changed parameter shapes: "
            r"'k_proj.bias' \(32, 1\) instead of \(32,\)"
        ),
    ),
    (BrokenStep, r"forward vs step differ .*step \(or init_state\) is likely wrong"),
]


@pytest.mark.parametrize("mixer_cls, message", PLANTED, ids=[cls.__name__ for cls, _ in PLANTED])
def test_planted_bug_is_caught_and_the_method_named(mixer_cls, message):
    with pytest.raises(AssertionError, match=message):
        check_mixer(mixer_cls)


def test_the_transfer_is_checked_for_every_bias_combination_under_grouped_query_attention():
    seen = []

    def promise(mixer, weights, geometry):
        """What ChunkedLinearAttention documents: q is the teacher's, k is repeated over query groups (copied
        into float32 layers, hence the tolerance)."""
        assert torch.allclose(mixer.q_proj.weight, weights.q, atol=1e-7)
        assert torch.allclose(mixer.k_proj.weight, repeat_kv_rows(geometry, weights.k), atol=1e-7)
        seen.append(
            (
                geometry.attention_bias,
                geometry.output_bias,
                weights.k_bias is not None,
                weights.o_bias is not None,
                geometry.num_kv_heads < geometry.num_heads,
            )
        )

    check_mixer(ChunkedLinearAttention, transfer_check=promise)
    assert sorted(seen) == [
        (False, False, False, False, True),
        (False, True, False, True, True),
        (True, False, True, False, True),
        (True, True, True, True, True),
    ]
