"""AdamW with bf16 moments (``optimizer.state_dtype: bfloat16``) against torch's fp32 AdamW."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mixerdistill.optimizers import SLICE, BF16MomentAdamW, build_optimizer, round_stochastically
from mixerdistill.stages import OptimizerConfig


def regression_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 8))
    inputs = torch.randn(256, 32, generator=generator)
    targets = torch.tanh(inputs @ torch.randn(32, 8, generator=generator))  # learnable
    return model, inputs, targets


def train(model: nn.Module, optimizer, inputs, targets, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 (1 + 2⁻⁷)
    torch.manual_seed(0)
    rounded = round_stochastically(value)
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.float().mean().item() - value[0].item()) < 2e-5
    assert round_stochastically(torch.tensor([-3.0, 0.0, 2.5])).tolist() == [-3.0, 0.0, 2.5]  # exact stays exact


def test_bf16_moments_follow_fp32_adamw():
    torch.manual_seed(0)
    reference, inputs, targets = regression_problem()
    lean = copy.deepcopy(reference)
    config = OptimizerConfig(lr=1e-2)
    fp32 = train(reference, build_optimizer(list(reference.parameters()), config), inputs, targets, 60)
    bf16_optimizer = build_optimizer(list(lean.parameters()), config.model_copy(update={"state_dtype": "bfloat16"}))
    assert isinstance(bf16_optimizer, BF16MomentAdamW)
    bf16 = train(lean, bf16_optimizer, inputs, targets, 60)
    assert bf16[-1] < 0.5 * bf16[0]  # it trains
    assert abs(bf16[-1] - fp32[-1]) < 0.005 * fp32[-1]  # and as fp32 AdamW does
    moments = [state["exp_avg_sq"] for state in bf16_optimizer.state.values()]
    assert all(m.dtype == torch.bfloat16 for m in moments)


def test_a_parameter_larger_than_one_slice_is_updated_whole():
    weight = nn.Parameter(torch.zeros(SLICE + 5))
    optimizer = BF16MomentAdamW([weight], lr=0.1, betas=(0.9, 0.95), eps=1e-8)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.full_like(weight, -0.1), atol=1e-3)


def test_resuming_from_a_state_dict_continues_exactly():
    model, inputs, targets = regression_problem()
    optimizer = BF16MomentAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    train(model, optimizer, inputs, targets, 5)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    torch.manual_seed(7)
    straight = train(model, optimizer, inputs, targets, 5)
    model.load_state_dict(saved_model)
    resumed_optimizer = BF16MomentAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    resumed_optimizer.load_state_dict(saved_state)  # torch casts the moments to fp32 here
    torch.manual_seed(7)
    assert train(model, resumed_optimizer, inputs, targets, 5) == straight
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in resumed_optimizer.state.values())
