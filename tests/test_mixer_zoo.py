"""Every built-in mixer passes the conformance check; family-specific facts (matrices, transfer, configs)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from conftest import run_cli
from mixerdistill.mixer import AttentionGeometry, AttentionWeights
from mixerdistill.ops.diagonal import diagonal_chunked, diagonal_materialised_matrix
from mixerdistill.ops.ssd import ssd_materialised_matrix, ssd_step
from mixerdistill.plugins import get_mixer
from mixerdistill.testing import check_mixer, relative_error
from mixerdistill_plugins.linear_attention import GatedLinearAttention, LinearAttention
from mixerdistill_plugins.mamba2 import Mamba2
from mixerdistill_plugins.toeplitz import Toeplitz

ZOO = [
    "attention",
    "discrete_mamba2",
    "semiseparable",
    "mamba2",
    "linear_attention",
    "gated_linear_attention",
    "toeplitz",
    "window_attention",
    "sum",
]

VARIANTS = [
    ("attention", {}),
    ("discrete_mamba2", {"chunk_size": 8}),
    ("discrete_mamba2", {"chunk_size": 8, "d_conv": 1}),
    ("semiseparable", {"chunk_size": 8}),
    ("semiseparable", {"chunk_size": 5, "d_state": 3, "num_heads": 2}),
    ("mamba2", {"chunk_size": 8}),
    ("mamba2", {"chunk_size": 8, "n_groups": 1, "d_state": 6, "conv_init": "random"}),
    ("linear_attention", {"chunk_size": 8}),
    ("linear_attention", {"chunk_size": 8, "feature_map": "identity", "normalize": False}),
    ("linear_attention", {"chunk_size": 8, "feature_map": "hedgehog"}),
    ("gated_linear_attention", {"chunk_size": 8}),
    ("gated_linear_attention", {"chunk_size": 8, "gate": "key_dim", "feature_map": "hedgehog"}),
    (
        "gated_linear_attention",
        {"chunk_size": 8, "data_dependent": False, "feature_map": "identity", "normalize": False},
    ),
    ("toeplitz", {"max_len": 12}),  # shorter than the sequence: offsets ≥ 12 weigh 0
    ("toeplitz", {"max_len": 64}),
    ("toeplitz", {"max_len": 1}),
    ("window_attention", {"window": 2}),
    ("window_attention", {"window": 64}),
    ("sum", {"parts": [{"name": "window_attention", "window": 4}, {"name": "discrete_mamba2", "chunk_size": 8}]}),
    (
        "sum",
        {
            "parts": [{"name": "discrete_mamba2", "chunk_size": 8}, {"name": "linear_attention", "chunk_size": 8}],
            "scales": [0.5, 0.5],
        },
    ),
]


@pytest.mark.parametrize("name, config", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_every_builtin_mixer_conforms(name, config):
    cls = get_mixer(name)
    report = check_mixer(cls, cls.Config(**config))
    assert "forward vs step" in report.errors and report.state_shapes


def test_plugins_lists_the_whole_zoo():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    assert set(ZOO) <= set(json.loads(result.stdout)["mixers"])


def test_conformance_catches_a_broken_step(tiny_geometry):
    class Broken(Toeplitz):
        def step(self, hidden_state, state, rotary=None):
            output, state = super().step(hidden_state, state)
            return output * 1.01, state

    with pytest.raises(AssertionError, match="forward vs step"):
        check_mixer(Broken, Broken.Config(max_len=4))


def test_conformance_catches_a_growing_state():
    class Growing(Toeplitz):
        def forward(self, hidden_states, state=None, rotary=None):
            output, new_state = super().forward(hidden_states, state)
            return output, {"values": torch.cat([new_state["values"], new_state["values"]], dim=1)}

    with pytest.raises(AssertionError, match="state"):
        check_mixer(Growing, Growing.Config(max_len=4))


# -- diagonal-decay SSM operators ----------------------------------------------------------------
def diagonal_inputs(T: int, seed: int = 0, batch: int = 2, H: int = 3, N: int = 5, P: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, H, P, generator=g, dtype=torch.float64)
    log_a = -F.softplus(torch.randn(batch, T, H, N, generator=g, dtype=torch.float64) - 1.0)
    B = torch.randn(batch, T, H, N, generator=g, dtype=torch.float64)
    C = torch.randn(batch, T, H, N, generator=g, dtype=torch.float64)
    return x, log_a, B, C


@pytest.mark.parametrize("T, chunk", [(23, 8), (5, 8), (16, 4)])
def test_diagonal_chunked_matrix_and_step_agree(T, chunk):
    x, log_a, B, C = diagonal_inputs(T)
    M = diagonal_materialised_matrix(log_a, B, C, chunk)
    b, h, i, j = 1, 2, T - 1, max(T - 4, 0)
    expected = (C[b, i, h] * B[b, j, h] * torch.exp(log_a[b, j + 1 : i + 1, h].sum(0))).sum()
    assert torch.allclose(M[b, h, i, j], expected)
    assert torch.equal(M, M.tril())
    y, final = diagonal_chunked(x, log_a, B, C, chunk)
    assert relative_error(y, (M @ x.transpose(1, 2)).transpose(1, 2)) <= 1e-12
    state = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    for t in range(T):
        _, state = ssd_step(x[:, t], log_a[:, t], B[:, t], C[:, t], state)
    assert relative_error(final, state) <= 1e-12


def test_diagonal_with_equal_decays_is_ssd():
    x, log_a, B, C = diagonal_inputs(17)
    scalar = log_a[..., 0]
    same = scalar.unsqueeze(-1).expand_as(log_a)
    assert relative_error(diagonal_materialised_matrix(same, B, C, 4), ssd_materialised_matrix(scalar, B, C)) <= 1e-12


def test_diagonal_matrix_survives_strong_decay():
    """Exponents never exceed 0: a decay of e^−30 per token over 200 tokens gives zeros, never inf or nan."""
    x, log_a, B, C = diagonal_inputs(200, N=2)
    M = diagonal_materialised_matrix(torch.full_like(log_a, -30.0), B, C, 16)
    assert torch.isfinite(M).all()
    assert torch.allclose(M.diagonal(dim1=-2, dim2=-1), (C * B).sum(-1).transpose(1, 2))


# -- family facts -----------------------------------------------------------------------------------
GEO = AttentionGeometry(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=0, layer_idx=0)


def teacher_weights() -> AttentionWeights:
    g = torch.Generator().manual_seed(3)
    return AttentionWeights(
        q=torch.randn(32, 32, generator=g),
        k=torch.randn(16, 32, generator=g),
        v=torch.randn(16, 32, generator=g),
        o=torch.randn(32, 32, generator=g),
    )


def scaled_scores(u: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """The teacher's causal q·k/√d (no softmax, no RoPE), (B, H, T, T), kv heads repeated."""
    batch, T, _ = u.shape
    q = (u @ weights.q.T).view(batch, T, 4, 8).transpose(1, 2)
    k = (u @ weights.k.T).view(batch, T, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    return (q @ k.transpose(-1, -2) * 8**-0.5).tril()


def test_identity_linear_attention_transfers_attention_logits():
    mixer = LinearAttention.from_attention(
        teacher_weights(), GEO, LinearAttention.Config(feature_map="identity", normalize=False)
    )
    u = torch.randn(2, 9, 32)
    assert relative_error(mixer.mixing_matrix(u), scaled_scores(u, teacher_weights())) <= 1e-5


def test_normalised_linear_attention_rows_sum_to_one():
    mixer = LinearAttention(GEO, LinearAttention.Config(feature_map="hedgehog"))
    M = mixer.mixing_matrix(torch.randn(2, 11, 32))
    assert (M >= 0).all() and torch.allclose(M.sum(-1), torch.ones(2, 4, 11), atol=1e-5)
    assert mixer.feature_dim == 16


def test_fixed_decay_gla_is_retnet_like():
    config = GatedLinearAttention.Config(feature_map="identity", normalize=False, data_dependent=False, a_init=0.5)
    mixer = GatedLinearAttention.from_attention(teacher_weights(), GEO, config)
    u = torch.randn(1, 6, 32)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    decay = torch.where(j <= i, 0.5 ** (i - j).clamp(min=0).float(), torch.zeros(()))
    assert relative_error(mixer.mixing_matrix(u), scaled_scores(u, teacher_weights()) * decay) <= 1e-5


def test_toeplitz_matrix_is_shift_invariant_and_input_independent():
    mixer = Toeplitz(GEO, Toeplitz.Config(max_len=4, a_init=0.5))
    M = mixer.mixing_matrix(torch.randn(2, 7, 32))
    assert torch.equal(M[0], mixer.mixing_matrix(torch.randn(1, 7, 32))[0])
    assert M[0, 1, 5, 3].item() == M[0, 1, 3, 1].item() == pytest.approx(0.5 * 0.25)
    assert M[0, 0, 6, 2] == 0  # offset 4 = max_len


def test_mamba2_transfer_gives_decayed_attention_scores():
    a = 0.8
    mixer = Mamba2.from_attention(teacher_weights(), GEO, Mamba2.Config(a_init=a))
    u = torch.randn(2, 10, 32)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    decay = torch.where(j <= i, a ** (i - j).clamp(min=0).float(), torch.zeros(()))
    # The SiLU conv (identity kernel) acts on q and k projections: C = silu(q·scale), B = silu(k).
    q = F.silu((u @ teacher_weights().q.T) * 8**-0.5).view(2, 10, 4, 8).transpose(1, 2)
    k = F.silu(u @ teacher_weights().k.T).view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    assert relative_error(mixer.mixing_matrix(u), (q @ k.transpose(-1, -2)) * decay) <= 1e-5


def test_mamba2_rejects_transfer_with_shared_groups():
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2.from_attention(teacher_weights(), GEO, Mamba2.Config(n_groups=1))


@pytest.mark.parametrize(
    "cls, bad",
    [
        (LinearAttention, {"feature_map": "identity"}),  # normalize defaults to true
        (LinearAttention, {"feature_map": "relu"}),
        (GatedLinearAttention, {"gate": "channel"}),
        (Toeplitz, {"max_len": 0}),
        (Mamba2, {"A_init_range": (16.0, 1.0)}),
        (Mamba2, {"kernel": "triton"}),
    ],
)
def test_configs_reject_bad_values(cls, bad):
    with pytest.raises(ValidationError):
        cls.Config(**bad)


def test_mamba2_init_follows_the_paper():
    torch.manual_seed(0)
    mixer = Mamba2(GEO, Mamba2.Config(num_heads=64))
    A = -torch.exp(mixer.A_log)
    dt = F.softplus(mixer.dt_bias)
    assert ((A <= -1) & (A >= -16)).all()
    assert ((dt >= 0.001 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert math.isclose(dt.log().std().item(), (math.log(0.1) - math.log(0.001)) / math.sqrt(12), rel_tol=0.3)
