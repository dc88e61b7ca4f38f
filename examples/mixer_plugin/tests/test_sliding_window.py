"""The tutorial mixer's own tests: the conformance check, and two facts of its family."""

import pytest
import torch

from mixerdistill.plugins import get_mixer
from mixerdistill.testing import check_mixer, random_attention_weights, rotary_for
from mixerdistill_window import SlidingWindowAttention


@pytest.mark.parametrize("window", [2, 4, 64])
def test_conforms(window):
    report = check_mixer(SlidingWindowAttention, SlidingWindowAttention.Config(window=window))
    assert set(report.transfers.values()) == {"checked"}


def test_a_window_longer_than_the_sequence_is_full_causal_attention(tiny_geometry):
    mixer = SlidingWindowAttention(tiny_geometry, SlidingWindowAttention.Config(window=32))
    M = mixer.mixing_matrix(torch.randn(1, 9, tiny_geometry.hidden_size))
    assert torch.allclose(M.sum(-1), torch.ones(1, tiny_geometry.num_heads, 9))
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    assert (M[..., causal] > 0).all() and (M[..., ~causal] == 0).all()


def test_a_window_as_long_as_the_sequence_is_the_teachers_attention(tiny_geometry):
    weights = random_attention_weights(tiny_geometry, torch.Generator().manual_seed(0), torch.float64)
    window = SlidingWindowAttention.from_attention(weights, tiny_geometry, SlidingWindowAttention.Config(window=9))
    attention_cls = get_mixer("attention")  # the built-in softmax attention, a copy of the teacher's layer
    attention = attention_cls.from_attention(weights, tiny_geometry, attention_cls.Config())
    u = torch.randn(2, 9, tiny_geometry.hidden_size, dtype=torch.float64)
    rotary = rotary_for(9, tiny_geometry.rotary_dim, 2, torch.float64)
    expected = attention(u, rotary=rotary)[0]
    assert torch.allclose(window.double()(u, rotary=rotary)[0], expected, atol=1e-5)
