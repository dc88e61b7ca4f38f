"""The tutorial mixer's own tests: the conformance check, and one fact of its family."""

import pytest
import torch

from mixerdistill.testing import check_mixer
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
