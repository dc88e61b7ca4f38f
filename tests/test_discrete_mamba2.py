"""The discrete Mamba-2 mixer and its SSD operators: materialised, chunked and recurrent paths agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mixerdistill.mixer import AttentionGeometry, AttentionWeights
from mixerdistill.ops.ssd import ssd_chunked, ssd_materialised_matrix, ssd_step
from mixerdistill_plugins.discrete_mamba2 import DiscreteMamba2, register_mixers

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to the reference's scale."""
    return ((a - b).norm() / b.norm()).item()


def geometry(output_bias: bool = False) -> AttentionGeometry:
    return AttentionGeometry(
        hidden_size=D_MODEL,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rotary_dim=HEAD_DIM,
        layer_idx=0,
        output_bias=output_bias,
    )


def ssd_inputs(T: int, dtype=torch.float32, seed: int = 0, batch: int = 2, H: int = 3, N: int = 5, P: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, H, P, generator=g, dtype=dtype)
    log_a = -F.softplus(torch.randn(batch, T, H, generator=g, dtype=dtype) - 1.0)  # a in about (0.1, 0.95)
    B = torch.randn(batch, T, H, N, generator=g, dtype=dtype)
    C = torch.randn(batch, T, H, N, generator=g, dtype=dtype)
    return x, log_a, B, C


def perturbed_mixer(dtype=torch.float32, d_conv: int = 4, chunk_size: int = 8, seed: int = 0) -> DiscreteMamba2:
    """A mixer whose conv, gate, decay and skip all differ from the identity-like initialisation."""
    torch.manual_seed(seed)
    config = DiscreteMamba2.Config(d_conv=d_conv, chunk_size=chunk_size)
    mixer = DiscreteMamba2(geometry(output_bias=True), config).to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


# -- (a, b) the SSD operators ----------------------------------------------------------------------
@pytest.mark.parametrize("T", [37, 5, 16])
def test_chunked_equals_materialised(T):
    x, log_a, B, C = ssd_inputs(T)
    M = ssd_materialised_matrix(log_a, B, C)  # (B, H, T, T)
    assert torch.equal(M, M.tril())
    expected = (M @ x.transpose(1, 2)).transpose(1, 2)
    y, _ = ssd_chunked(x, log_a, B, C, chunk_size=8)
    assert y.shape == x.shape
    assert rel(y, expected) <= 1e-5


def test_materialised_matrix_entries():
    x, log_a, B, C = ssd_inputs(6, dtype=torch.float64)
    M = ssd_materialised_matrix(log_a, B, C)
    b, h, i, j = 1, 2, 5, 2
    decay = torch.exp(log_a[b, j + 1 : i + 1, h].sum())
    assert torch.allclose(M[b, h, i, j], (C[b, i, h] @ B[b, j, h]) * decay)
    assert M[b, h, j, i] == 0


def test_chunked_final_state_equals_step_loop():
    x, log_a, B, C = ssd_inputs(21)
    y, final = ssd_chunked(x, log_a, B, C, chunk_size=8)
    state = torch.zeros(x.shape[0], x.shape[2], B.shape[-1], x.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        y_t, state = ssd_step(x[:, t], log_a[:, t], B[:, t], C[:, t], state)
        ys.append(y_t)
    assert final.shape == state.shape
    assert rel(final, state) <= 1e-5
    assert rel(y, torch.stack(ys, dim=1)) <= 1e-5


def test_chunked_continues_from_initial_state():
    x, log_a, B, C = ssd_inputs(29)
    y, final = ssd_chunked(x, log_a, B, C, chunk_size=8)
    cut = 13  # not a chunk boundary
    y1, s1 = ssd_chunked(x[:, :cut], log_a[:, :cut], B[:, :cut], C[:, :cut], chunk_size=8)
    y2, s2 = ssd_chunked(x[:, cut:], log_a[:, cut:], B[:, cut:], C[:, cut:], chunk_size=8, initial_state=s1)
    assert rel(torch.cat([y1, y2], dim=1), y) <= 1e-5
    assert rel(s2, final) <= 1e-5


def test_chunked_backward_equals_autograd_through_the_recurrence():
    """The hand-written backward of the chunked path gives the gradients autograd finds through the
    token-by-token recurrence, for every input including the initial state (float64, T not a multiple of Q)."""
    x, log_a, B, C = ssd_inputs(29, dtype=torch.float64)
    initial = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    y_weight, state_weight = torch.randn_like(x), torch.randn_like(initial)

    def recurrence(x, log_a, B, C, state):
        ys = []
        for t in range(x.shape[1]):
            y_t, state = ssd_step(x[:, t], log_a[:, t], B[:, t], C[:, t], state)
            ys.append(y_t)
        return torch.stack(ys, dim=1), state

    gradients = []
    for fn in (lambda *t: ssd_chunked(*t[:4], chunk_size=8, initial_state=t[4]), recurrence):
        leaves = [t.clone().requires_grad_() for t in (x, log_a, B, C, initial)]
        y, final = fn(*leaves)
        ((y * y_weight).sum() + (final * state_weight).sum()).backward()
        gradients.append([leaf.grad for leaf in leaves])
    for name, chunked, reference in zip(["x", "log_a", "B", "C", "initial_state"], *gradients):
        assert rel(chunked, reference) <= 1e-10, name


# -- (c, d) the mixer's three paths ----------------------------------------------------------------
@pytest.mark.parametrize("d_conv", [4, 1])
def test_forward_materialised_and_step_agree(d_conv):
    mixer = perturbed_mixer(d_conv=d_conv)
    u = torch.randn(2, 19, D_MODEL)
    out, state = mixer(u)
    assert out.shape == u.shape
    assert rel(mixer.materialised_forward(u), out) <= 1e-5

    step_state = mixer.init_state(2)
    steps = []
    for t in range(u.shape[1]):
        o_t, step_state = mixer.step(u[:, t], step_state)
        steps.append(o_t)
    assert rel(torch.stack(steps, dim=1), out) <= 1e-5
    assert state["conv"].shape == step_state["conv"].shape == (2, mixer.conv_dim, d_conv - 1)
    assert rel(state["ssm"], step_state["ssm"]) <= 1e-5
    if d_conv > 1:
        assert torch.allclose(state["conv"], step_state["conv"])


@pytest.mark.parametrize("cut", [10, 2])  # 2 < d_conv − 1: the conv state mixes the old state and new tokens
def test_forward_continues_from_state(cut):
    mixer = perturbed_mixer()
    u = torch.randn(2, 19, D_MODEL)
    out, state = mixer(u)
    _, first = mixer(u[:, :cut])
    out_a, mid = mixer(u[:, cut : cut + 1], state=first)  # one token, then the rest
    out_b, last = mixer(u[:, cut + 1 :], state=mid)
    assert rel(torch.cat([out_a, out_b], dim=1), out[:, cut:]) <= 1e-5
    assert rel(last["ssm"], state["ssm"]) <= 1e-5
    assert torch.allclose(last["conv"], state["conv"])


def test_gradients_of_forward_and_materialised_agree():
    mixer = perturbed_mixer(dtype=torch.float64)
    u = torch.randn(2, 19, D_MODEL, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 19, D_MODEL, dtype=torch.float64)
    grads = []
    for path in (lambda: mixer(u)[0], lambda: mixer.materialised_forward(u)):
        mixer.zero_grad()
        u.grad = None
        (path() * weight).sum().backward()
        grads.append({"input": u.grad.clone(), **{n: p.grad.clone() for n, p in mixer.named_parameters()}})
    fast, reference = grads
    assert set(fast) == {"input", *dict(mixer.named_parameters())}
    for name in reference:
        assert rel(fast[name], reference[name]) <= 1e-5, name


def test_matrix_parameters_shape_the_matrix():
    mixer = perturbed_mixer()
    u = torch.randn(1, 9, D_MODEL)
    mixer.mixing_matrix(u).square().sum().backward()
    with_grad = {id(p) for p in mixer.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {id(p) for p in mixer.matrix_parameters()}


# -- (e) transfer from attention -------------------------------------------------------------------
def teacher_weights(output_bias: bool) -> AttentionWeights:
    g = torch.Generator().manual_seed(1)
    return AttentionWeights(
        q=torch.randn(HEADS * HEAD_DIM, D_MODEL, generator=g),
        k=torch.randn(KV_HEADS * HEAD_DIM, D_MODEL, generator=g),
        v=torch.randn(KV_HEADS * HEAD_DIM, D_MODEL, generator=g),
        o=torch.randn(D_MODEL, HEADS * HEAD_DIM, generator=g),
        o_bias=torch.randn(D_MODEL, generator=g) if output_bias else None,
    )


@pytest.mark.parametrize("output_bias", [False, True])
def test_from_attention_copies_teacher_weights(output_bias):
    weights, geo = teacher_weights(output_bias), geometry(output_bias)
    mixer = DiscreteMamba2.from_attention(weights, geo, DiscreteMamba2.Config())
    hd, group = HEADS * HEAD_DIM, HEADS // KV_HEADS
    x_rows, B_rows, C_rows, z_rows, A_rows = mixer.in_proj.weight.detach().split([hd, hd, hd, hd, HEADS])
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        kv_rows = slice((h // group) * HEAD_DIM, (h // group + 1) * HEAD_DIM)
        assert torch.equal(x_rows[rows], weights.v[kv_rows])
        assert torch.equal(B_rows[rows], weights.k[kv_rows])
        assert torch.allclose(C_rows[rows], weights.q[rows] * HEAD_DIM**-0.5)
    assert not z_rows.any() and not A_rows.any()
    assert torch.equal(mixer.out_proj.weight.detach(), weights.o)
    if output_bias:
        assert torch.equal(mixer.out_proj.bias.detach(), weights.o_bias)
    else:
        assert mixer.out_proj.bias is None


def test_from_attention_matrix_is_decayed_attention_scores():
    weights, geo = teacher_weights(True), geometry(True)
    a = 0.8
    mixer = DiscreteMamba2.from_attention(weights, geo, DiscreteMamba2.Config(a_init=a))
    T = 11
    u = torch.randn(2, T, D_MODEL)

    Q = (u @ weights.q.T).view(2, T, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, d)
    K = (u @ weights.k.T).view(2, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    V = (u @ weights.v.T).view(2, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
    K, V = (t[:, [h // (HEADS // KV_HEADS) for h in range(HEADS)]] for t in (K, V))  # repeat_kv
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    decay = torch.where(j <= i, a ** (i - j).clamp(min=0).float(), torch.zeros(()))
    expected = (Q @ K.transpose(-1, -2)) * HEAD_DIM**-0.5 * decay  # (B, H, T, T)
    assert rel(mixer.mixing_matrix(u), expected) <= 1e-5

    y = (expected @ V + V).transpose(1, 2).flatten(2)  # D = 1
    expected_out = F.silu(torch.tensor(1.2785)) * y @ weights.o.T + weights.o_bias
    out, _ = mixer(u)
    assert rel(out, expected_out) <= 1e-5


def test_average_transfer_starts_as_normalised_moving_average():
    weights, geo = teacher_weights(False), geometry(False)
    a = 0.7
    mixer = DiscreteMamba2.from_attention(weights, geo, DiscreteMamba2.Config(a_init=a, bc_transfer="average"))
    T = 9
    M = mixer.mixing_matrix(torch.randn(2, T, D_MODEL))  # independent of the input
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    expected = torch.where(j <= i, (1 - a) * a ** (i - j).clamp(min=0).float(), torch.zeros(()))
    assert rel(M, expected.expand_as(M)) <= 1e-5
    assert torch.allclose(M.sum(-1)[..., -1], torch.tensor(1 - a**T))  # rows sum to 1 − a^(i+1)
    x_rows = mixer.in_proj.weight.detach()[: HEADS * HEAD_DIM]
    assert torch.equal(x_rows[:HEAD_DIM], weights.v[:HEAD_DIM])  # x ← v still transferred


@pytest.mark.parametrize("field, value", [("d_state", 4), ("head_dim", 16), ("num_heads", 2)])
def test_from_attention_rejects_mismatched_shapes(field, value):
    config = DiscreteMamba2.Config(**{field: value})
    with pytest.raises(ValueError, match=field):
        DiscreteMamba2.from_attention(teacher_weights(False), geometry(), config)


def test_fresh_mixer_uses_config_sizes_and_init():
    config = DiscreteMamba2.Config(d_state=6, head_dim=5, num_heads=3, D_init=0.5, gate_bias_init=2.0)
    mixer = DiscreteMamba2(geometry(), config)
    assert mixer.in_proj.weight.shape == (2 * 3 * 5 + 2 * 3 * 6 + 3, D_MODEL)
    assert torch.equal(mixer.conv1d.weight[:, 0], torch.tensor([0.0, 0, 0, 1]).expand(mixer.conv_dim, 4))
    assert torch.allclose(torch.exp(-F.softplus(mixer.A_log_bias)), torch.tensor(0.9))
    assert torch.equal(mixer.D.detach(), torch.full((3,), 0.5))
    assert torch.equal(mixer.z_bias.detach(), torch.full((15,), 2.0))
    out, state = mixer(torch.randn(1, 7, D_MODEL))
    assert out.shape == (1, 7, D_MODEL) and state["ssm"].shape == (1, 3, 6, 5)


# -- (f) configuration and registration ------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        {"d_stat": 8},
        {"chunk_size": 0},
        {"a_init": 1.0},
        {"a_init": 0.0},
        {"d_conv": 0},
        {"conv_init": "zeros"},
        {"num_heads": 0},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError) as info:
        DiscreteMamba2.Config(**bad)
    assert next(iter(bad)) in str(info.value)


def test_registers_as_discrete_mamba2():
    found = {}
    register_mixers(lambda name, thing: found.setdefault(name, thing))
    assert found == {"discrete_mamba2": DiscreteMamba2}
