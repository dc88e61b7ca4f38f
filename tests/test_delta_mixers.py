"""Delta-rule and mLSTM students: the exact mixing matrix, the chunked path and the token recurrence agree.

References here are written from the defining recurrences (the v-first form of the issue for the delta
rule, the unstabilised mLSTM), independently of ``mixerdistill.ops``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixerdistill.mixer import AttentionGeometry, AttentionWeights
from mixerdistill.ops.delta import delta_rule, delta_rule_matrix_rows, delta_rule_step
from mixerdistill.ops.mlstm import mlstm_chunked, mlstm_matrix_rows, mlstm_step
from mixerdistill.ops.ssd import segsum
from mixerdistill.plugins import get_mixer
from mixerdistill.testing import check_mixer, relative_error

VARIANTS = [
    ("gated_delta_net", {"chunk_size": 8}),
    ("gated_delta_net", {"chunk_size": 5, "d_conv": 1, "output_norm": False, "conv_activation": "identity"}),
    ("delta_net", {"chunk_size": 8}),
    ("delta_net", {"chunk_size": 32, "output_gate": True}),  # one chunk longer than the sequence
    ("mlstm", {"chunk_size": 8}),
    ("mlstm", {"chunk_size": 4, "output_gate": False, "output_norm": False}),
]


@pytest.mark.parametrize("name, config", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_new_mixers_conform(name, config):
    cls = get_mixer(name)
    report = check_mixer(cls, cls.Config(**config))
    assert max(report.errors.values()) <= 1e-10


def delta_inputs(
    T: int, dtype=torch.float64, gated: bool = True, seed: int = 0, batch: int = 2, H: int = 3, N: int = 6, P: int = 5
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, H, N, generator=g, dtype=torch.float64) * N**-0.5
    k = F.normalize(torch.randn(batch, T, H, N, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, T, H, P, generator=g, dtype=torch.float64)
    beta = torch.sigmoid(torch.randn(batch, T, H, generator=g, dtype=torch.float64))
    log_a = -F.softplus(torch.randn(batch, T, H, generator=g, dtype=torch.float64) - 1.0) if gated else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (q, k, v, beta, log_a)]


def delta_recurrence(q, k, v, beta, log_a):
    """The issue's form: S_t = S_{t−1} α_t (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ (S: P × N), o_t = S_t q_t."""
    batch, T, H, N = k.shape
    S = v.new_zeros(batch, H, v.shape[-1], N)
    eye = torch.eye(N, dtype=v.dtype)
    outputs = []
    for t in range(T):
        k_t, b_t = k[:, t], beta[:, t][..., None, None]
        alpha = 1.0 if log_a is None else log_a[:, t].exp()[..., None, None]
        S = (
            S @ (alpha * (eye - b_t * k_t[..., :, None] * k_t[..., None, :]))
            + b_t * v[:, t][..., :, None] * k_t[..., None, :]
        )
        outputs.append((S @ q[:, t][..., None])[..., 0])
    return torch.stack(outputs, dim=1), S.transpose(-1, -2)  # state as (B, H, N, P)


def closed_form_matrix(q, k, beta, log_a):
    """M = (tril(Q Kᵀ) ∘ Γ) (I + strictly-lower(diag(β) K Kᵀ ∘ Γ))⁻¹ diag(β), with an explicit inverse."""
    q, k, beta = (t.transpose(1, 2) for t in (q, k, beta))
    T = q.shape[2]
    gamma = torch.ones(T, T, dtype=q.dtype).tril() if log_a is None else segsum(log_a.transpose(1, 2)).exp()
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
    return (
        ((q @ k.transpose(-1, -2)) * gamma) @ torch.linalg.inv(torch.eye(T, dtype=q.dtype) + A) @ torch.diag_embed(beta)
    )


def apply(M, v):
    return (M @ v.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize("gated", [True, False])
def test_delta_rule_matrix_is_the_closed_form_and_the_recurrence(gated):
    q, k, v, beta, log_a = delta_inputs(21, gated=gated)
    expected, final = delta_recurrence(q, k, v, beta, log_a)
    M = delta_rule_matrix_rows(q, k, beta, log_a, chunk_size=4)(0, 21)
    assert torch.equal(M, M.tril())
    assert relative_error(M, closed_form_matrix(q, k, beta, log_a)) <= 1e-12
    assert relative_error(apply(M, v), expected) <= 1e-12
    assert relative_error(delta_rule_matrix_rows(q, k, beta, log_a, 4)(6, 15), M[:, :, 6:15, :15]) <= 1e-13
    y, state = delta_rule(q, k, v, beta, log_a, chunk_size=4, kernel="reference")
    assert relative_error(y, expected) <= 1e-12 and relative_error(state, final) <= 1e-12
    stepped = torch.zeros_like(state)
    for t in range(21):
        _, stepped = delta_rule_step(
            q[:, t], k[:, t], v[:, t], beta[:, t], None if log_a is None else log_a[:, t], stepped
        )
    assert relative_error(stepped, final) <= 1e-12


def gradients(output, inputs, weight):
    return torch.autograd.grad((output * weight).sum(), [t for t in inputs if t is not None])


@pytest.mark.parametrize("gated", [True, False])
def test_delta_rule_paths_agree_in_fp32_with_gradients(gated):
    """Target: materialised, recurrent and chunked within 1e-5 (relative) in fp32, gradients included."""
    inputs = delta_inputs(70, dtype=torch.float32, gated=gated)
    q, k, v, beta, log_a = inputs
    weight = torch.randn(2, 70, 3, 5)
    paths = {
        "recurrent": delta_recurrence(*inputs)[0],
        "materialised": apply(delta_rule_matrix_rows(q, k, beta, log_a, 16)(0, 70), v),
        "chunked": delta_rule(q, k, v, beta, log_a, 16, kernel="reference")[0],
    }
    reference = gradients(paths["recurrent"], inputs, weight)
    for name in ("materialised", "chunked"):
        assert relative_error(paths[name], paths["recurrent"]) <= 1e-5, name
        for got, want in zip(gradients(paths[name], inputs, weight), reference):
            assert relative_error(got, want) <= 1e-5, name


def mlstm_inputs(
    T: int,
    dtype=torch.float64,
    seed: int = 0,
    batch: int = 2,
    H: int = 3,
    N: int = 6,
    P: int = 5,
    input_offset: float = 0.0,
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, H, N, generator=g, dtype=torch.float64) * N**-0.5
    k = torch.randn(batch, T, H, N, generator=g, dtype=torch.float64)
    v = torch.randn(batch, T, H, P, generator=g, dtype=torch.float64)
    log_f = F.logsigmoid(torch.randn(batch, T, H, generator=g, dtype=torch.float64) + 2.0)
    log_i = torch.randn(batch, T, H, generator=g, dtype=torch.float64) + input_offset
    return [t.to(dtype).requires_grad_() for t in (q, k, v, log_f, log_i)]


def mlstm_recurrence(q, k, v, log_f, log_i):
    """Unstabilised: C_t = f C + i k vᵀ, n_t = f n + i k, h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)."""
    batch, T, H, N = k.shape
    C, n = v.new_zeros(batch, H, N, v.shape[-1]), v.new_zeros(batch, H, N)
    outputs = []
    for t in range(T):
        f, i = log_f[:, t].exp(), log_i[:, t].exp()
        C = f[..., None, None] * C + i[..., None, None] * k[:, t][..., :, None] * v[:, t][..., None, :]
        n = f[..., None] * n + i[..., None] * k[:, t]
        denominator = (q[:, t] * n).sum(-1, keepdim=True).abs().clamp(min=1.0)
        outputs.append((q[:, t][..., None, :] @ C)[..., 0, :] / denominator)
    return torch.stack(outputs, dim=1), C, n


def test_mlstm_matrix_chunked_and_step_match_the_recurrence():
    q, k, v, log_f, log_i = inputs = mlstm_inputs(21)
    expected, C, n = mlstm_recurrence(*inputs)
    rows = mlstm_matrix_rows(q, k, log_f, log_i)
    M = rows(0, 21)
    assert torch.equal(M, M.tril())
    assert relative_error(apply(M, v), expected) <= 1e-12
    assert relative_error(rows(5, 13), M[:, :, 5:13, :13]) <= 1e-13
    y, (memory, normaliser, stabiliser) = mlstm_chunked(*inputs, chunk_size=4)
    assert relative_error(y, expected) <= 1e-12
    assert relative_error(memory * stabiliser.exp()[..., None, None], C) <= 1e-12  # C' = C e^{−m}
    assert relative_error(normaliser * stabiliser.exp()[..., None], n) <= 1e-12
    state = (torch.zeros_like(memory), torch.zeros_like(normaliser), torch.zeros_like(stabiliser))
    for t in range(21):
        _, state = mlstm_step(q[:, t], k[:, t], v[:, t], log_f[:, t], log_i[:, t], state)
    for got, want in zip(state, (memory, normaliser, stabiliser)):
        assert relative_error(got, want) <= 1e-12


def test_mlstm_paths_agree_in_fp32_with_gradients():
    inputs = mlstm_inputs(70, dtype=torch.float32)
    q, k, v, log_f, log_i = inputs
    weight = torch.randn(2, 70, 3, 5)
    paths = {
        "recurrent": mlstm_recurrence(*inputs)[0],
        "materialised": apply(mlstm_matrix_rows(q, k, log_f, log_i)(0, 70), v),
        "chunked": mlstm_chunked(*inputs, chunk_size=16)[0],
    }
    reference = gradients(paths["recurrent"], inputs, weight)
    for name in ("materialised", "chunked"):
        assert relative_error(paths[name], paths["recurrent"]) <= 1e-5, name
        for got, want in zip(gradients(paths[name], inputs, weight), reference):
            assert relative_error(got, want) <= 1e-5, name


def test_mlstm_stabiliser_keeps_huge_input_gates_finite():
    """ĩ ≈ 800: e^{ĩ} overflows float64, yet every path stays finite and they agree."""
    q, k, v, log_f, log_i = mlstm_inputs(40, input_offset=800.0)
    y, state = mlstm_chunked(q, k, v, log_f, log_i, chunk_size=8)
    M = mlstm_matrix_rows(q, k, log_f, log_i)(0, 40)
    assert torch.isfinite(y).all() and all(torch.isfinite(s).all() for s in state) and torch.isfinite(M).all()
    assert relative_error(apply(M, v), y) <= 1e-9
    # Subtracting a constant from every ĩ changes nothing while |n_tᵀ q_t| ≥ 1: the normaliser cancels it.
    shifted, _ = mlstm_chunked(q, k, v, log_f, log_i - 100.0, chunk_size=8)
    assert relative_error(shifted, y) <= 1e-9


def test_from_attention_copies_qkvo_and_repeats_kv_heads(tiny_geometry):
    g = tiny_geometry
    torch.manual_seed(0)
    weights = AttentionWeights(
        q=torch.randn(g.num_heads * g.head_dim, g.hidden_size),
        k=torch.randn(g.num_kv_heads * g.head_dim, g.hidden_size),
        v=torch.randn(g.num_kv_heads * g.head_dim, g.hidden_size),
        o=torch.randn(g.hidden_size, g.num_heads * g.head_dim),
        o_bias=torch.randn(g.hidden_size),
    )
    for name in ("gated_delta_net", "delta_net", "mlstm"):
        mixer = get_mixer(name).from_attention(weights, g, get_mixer(name).Config())
        assert torch.equal(mixer.q_proj.weight, weights.q) and torch.equal(mixer.o_proj.bias, weights.o_bias)
        k_heads = mixer.k_proj.weight.view(g.num_heads, g.head_dim, -1)
        for head in range(g.num_heads):  # kv head h // groups serves query head h
            assert torch.equal(k_heads[head], weights.k.view(g.num_kv_heads, g.head_dim, -1)[head // g.query_groups])
        assert torch.equal(
            mixer.v_proj.weight.view(g.num_heads, g.head_dim, -1)[3], weights.v.view(g.num_kv_heads, g.head_dim, -1)[1]
        )


def test_student_starts_with_open_gates_and_the_teachers_scale():
    """Fresh mixers: β, α, f at their configured starts, the output gate ≈ 1 and the query scale 1/√d."""
    geometry = AttentionGeometry(hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8, rotary_dim=0, layer_idx=0)
    u = torch.randn(1, 3, 16)
    gdn = get_mixer("gated_delta_net")(geometry, get_mixer("gated_delta_net").Config(beta_init=0.25, a_init=0.8))
    beta, log_a = gdn._gates(u)
    assert torch.allclose(beta, torch.full_like(beta, 0.25)) and torch.allclose(
        log_a.exp(), torch.full_like(log_a, 0.8)
    )
    assert torch.allclose(F.silu(gdn.g_proj(u)), torch.ones(1, 3, 16), atol=1e-4)
    assert torch.allclose(gdn.log_q_scale.exp(), torch.full((2,), 8**-0.5))
    mlstm = get_mixer("mlstm")(geometry, get_mixer("mlstm").Config(forget_init=0.95))
    log_f, log_i = mlstm._gates(u)
    assert torch.allclose(log_f.exp(), torch.full_like(log_f, 0.95)) and torch.equal(log_i, torch.zeros_like(log_i))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gated", [True, False])
def test_fla_delta_rule_kernel_matches_the_reference(gated):
    pytest.importorskip("fla.ops.gated_delta_rule")
    q, k, v, beta, log_a = (
        None if t is None else t.detach().cuda().float().requires_grad_()
        for t in delta_inputs(300, gated=gated, N=64, P=64)
    )
    state = torch.randn(2, 3, 64, 64, device="cuda") * 0.1
    weight = torch.randn(2, 300, 3, 64, device="cuda")
    results = {}
    for kernel in ("reference", "cuda"):
        y, final = delta_rule(q, k, v, beta, log_a, 64, state, kernel=kernel)
        results[kernel] = (y, final, gradients(y, (q, k, v, beta, log_a), weight))
    (y_ref, final_ref, grads_ref), (y_cuda, final_cuda, grads_cuda) = results["reference"], results["cuda"]
    assert relative_error(y_cuda, y_ref) <= 2e-3 and relative_error(final_cuda, final_ref) <= 2e-3
    for got, want in zip(grads_cuda, grads_ref):
        assert relative_error(got, want) <= 5e-3


@pytest.mark.slow  # a fresh interpreter for the memory figures and a token loop: ~20 s of CPU
def test_delta_benchmark_reports_every_path_and_the_growth_of_the_chunked_one():
    from mixerdistill.bench import delta

    result = delta.run(lengths=[64, 128], repeats=1, cells=("gated_delta_rule",))
    assert {(row["T"], row["path"]) for row in result["rows"]} == {
        (T, path) for T in (64, 128) for path in ("materialised", "chunked", "recurrent")
    }
    assert all(row["forward_backward_ms"] > 0 and row["peak_MB"] >= 0 and row["saved_MB"] > 0 for row in result["rows"])
    assert set(result["summary"]) == {
        f"gated_delta_rule_{key}_growth_T64_to_T128"
        for key in ("forward_backward", "forward_backward_cpu", "saved", "memory")
    }
