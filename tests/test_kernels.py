"""Kernel selection (auto / reference / cuda) on CPU, and fused CUDA kernels against the reference paths.

The ``gpu`` tests need CUDA and the ``cuda`` extra (mamba-ssm, causal-conv1d, flash-linear-attention);
they are skipped elsewhere. Each compares outputs, final states and gradients, relative to the scale of
the reference, in float32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mixerdistill.errors import UserError
from mixerdistill.ops import kernels
from mixerdistill.ops.conv import causal_conv1d
from mixerdistill.ops.diagonal import diagonal_chunked
from mixerdistill.ops.ssd import ssd, ssd_chunked
from mixerdistill.testing import relative_error, tiny_geometry_value
from mixerdistill_plugins.discrete_mamba2 import DiscreteMamba2


def test_cuda_choice_on_cpu_is_a_clear_error():
    x = torch.randn(1, 4, 2, 3)
    with pytest.raises(UserError, match="kernel: cuda.*SSD.*CUDA"):
        ssd(x, -torch.rand(1, 4, 2), torch.randn(1, 4, 2, 5), torch.randn(1, 4, 2, 5), 2, kernel="cuda")
    mixer = DiscreteMamba2(tiny_geometry_value(), DiscreteMamba2.Config(kernel="cuda"))
    with pytest.raises(UserError, match="kernel: cuda"):
        mixer(torch.randn(1, 4, 32))


def test_auto_falls_back_with_one_notice_and_reference_stays_quiet(monkeypatch, capsys):
    monkeypatch.setattr(kernels, "_noticed", set())
    x, log_a, B, C = torch.randn(1, 9, 2, 3), -torch.rand(1, 9, 2), torch.randn(1, 9, 2, 5), torch.randn(1, 9, 2, 5)
    ssd(x, log_a, B, C, 4, kernel="reference")
    assert "reference path" not in capsys.readouterr().err
    for _ in range(3):
        y, state = ssd(x, log_a, B, C, 4, kernel="auto")
    err = capsys.readouterr().err
    assert err.count("SSD runs its PyTorch reference path") == 1 and "CUDA" in err
    expected, expected_state = ssd_chunked(x, log_a, B, C, 4)
    assert torch.equal(y, expected) and torch.equal(state, expected_state)


# -- GPU: fused kernels against the references --------------------------------------------------------
def has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def compare(fast_fn, reference_fn, inputs: list[torch.Tensor], tolerance: float = 2e-3) -> None:
    """Outputs, final states and input gradients of two (y, state) functions agree."""
    results = []
    for fn in (fast_fn, reference_fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y, state = fn(*leaves)
        torch.manual_seed(0)
        ((y * torch.randn_like(y)).sum() + (state * torch.randn_like(state)).sum()).backward()
        results.append((y.detach(), state.detach(), [leaf.grad for leaf in leaves]))
    (y_fast, s_fast, g_fast), (y_ref, s_ref, g_ref) = results
    assert relative_error(y_fast, y_ref) <= tolerance
    assert relative_error(s_fast, s_ref) <= tolerance
    for index, (fast, reference) in enumerate(zip(g_fast, g_ref)):
        if reference is not None:
            assert relative_error(fast, reference) <= tolerance, f"gradient of input {index}"


def ssd_case(T: int = 300, H: int = 4, N: int = 16, P: int = 32, per_state: bool = False, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, T, H, P, generator=g)
    log_a = -F.softplus(torch.randn(2, T, H, *((N,) if per_state else ()), generator=g) - 2.0)
    B, C = (torch.randn(2, T, H, N, generator=g) * N**-0.5 for _ in range(2))
    state = torch.randn(2, H, N, P, generator=g)
    return [t.to(device) for t in (x, log_a, B, C, state)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not has("mamba_ssm"), reason="needs mamba-ssm")
def test_mamba_ssm_ssd_matches_reference():
    compare(
        lambda x, a, B, C, s: ssd(x, a, B, C, 64, s, kernel="cuda", library="mamba_ssm"),
        lambda x, a, B, C, s: ssd_chunked(x, a, B, C, 64, s),
        ssd_case(),
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not has("fla"), reason="needs flash-linear-attention")
def test_fla_simple_gla_matches_reference():
    compare(
        lambda x, a, B, C, s: ssd(x, a, B, C, 64, s, kernel="cuda", library="fla"),
        lambda x, a, B, C, s: ssd_chunked(x, a, B, C, 64, s),
        ssd_case(),
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not has("fla"), reason="needs flash-linear-attention")
def test_fla_gla_matches_diagonal_reference():
    compare(
        lambda x, a, B, C, s: ssd(x, a, B, C, 64, s, kernel="cuda"),
        lambda x, a, B, C, s: diagonal_chunked(x, a, B, C, 64, s),
        ssd_case(per_state=True),
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not has("causal_conv1d"), reason="needs causal-conv1d")
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_causal_conv1d_kernel_matches_reference(activation):
    g = torch.Generator(device="cpu").manual_seed(0)
    x, weight, bias = (
        torch.randn(2, 64, 300, generator=g),
        torch.randn(64, 1, 4, generator=g),
        torch.randn(64, generator=g),
    )
    compare(
        lambda x, w, b: causal_conv1d(x, w, b, activation=activation, kernel="cuda"),
        lambda x, w, b: causal_conv1d(x, w, b, activation=activation, kernel="reference"),
        [t.cuda() for t in (x, weight, bias)],
        tolerance=1e-4,
    )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not (has("mamba_ssm") and has("fla") and has("causal_conv1d")), reason="needs the cuda extra")
@pytest.mark.parametrize(
    "name, config",
    [
        ("discrete_mamba2", {}),
        ("mamba2", {}),
        ("semiseparable", {}),
        ("linear_attention", {}),
        ("gated_linear_attention", {"gate": "key_dim"}),
    ],
)
def test_mixers_on_kernels_match_reference(name, config):
    from mixerdistill.plugins import get_mixer

    cls = get_mixer(name)
    torch.manual_seed(0)
    fast = cls(tiny_geometry_value(), cls.Config(chunk_size=64, kernel="cuda", **config)).cuda()
    reference = cls(tiny_geometry_value(), cls.Config(chunk_size=64, kernel="reference", **config)).cuda()
    reference.load_state_dict(fast.state_dict())
    u = torch.randn(2, 200, 32, device="cuda")
    out_fast, state_fast = fast(u)
    out_ref, state_ref = reference(u)
    assert relative_error(out_fast, out_ref) <= 2e-3
    for key in state_ref:
        assert relative_error(state_fast[key], state_ref[key]) <= 2e-3, key
    out_fast.square().sum().backward()
    out_ref.square().sum().backward()
    for (param_name, p_fast), p_ref in zip(fast.named_parameters(), reference.parameters()):
        assert relative_error(p_fast.grad, p_ref.grad) <= 5e-3, param_name
