"""The stages' optimizer: AdamW, its moments in fp32 (torch's own) or in bf16 (half the optimizer's memory).

Stage 3 trains every weight of the student, and AdamW's two moments are then the largest thing in the
process (1.26 GB of the SmolLM2 demo's peak, docs/performance.md). ``BF16MomentAdamW`` keeps them in
bfloat16 and does the arithmetic of each update in fp32, a slice of ``SLICE`` elements at a time, so no
update allocates more than a few 4 MB temporaries. Rounding the moments back to bf16 is stochastic (unbiased):
with round-to-nearest, an EMA step smaller than half a bf16 ulp (2⁻⁸ of the value) would be lost every time.
The random bits are drawn once per step, one slice's worth per moment, and serve every slice of every
parameter: each element still gets uniform bits (so the rounding stays unbiased), and drawing them was
two thirds of the update's time when each slice drew its own (2.8 s against fp32 AdamW's 1.05 s per step
for 179M parameters on 2 cores).
"""

from __future__ import annotations

import torch
from torch import nn

# Elements updated at once: 4 MB per fp32 temporary. 2²² (16 MB) added 0.08 GB to the peak of Gemma 3's stage-2
# step (docs/teachers.md); 2²⁰ is as fast.
SLICE = 1 << 20


def build_optimizer(parameters: list[nn.Parameter], config) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm weights, biases and per-head scalars are not decayed);
    ``config.state_dtype`` picks where its moments live."""
    decayed = [p for p in parameters if p.ndim >= 2]
    plain = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    settings = {"lr": config.lr, "betas": tuple(config.betas), "eps": config.eps}
    if config.state_dtype == "float32":
        return torch.optim.AdamW(groups, **settings)
    return BF16MomentAdamW(groups, **settings)


class BF16MomentAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose moments are stored in bfloat16."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("BF16MomentAdamW does not take a closure")
        largest = max((p.numel() for g in self.param_groups for p in g["params"] if p.grad is not None), default=0)
        noise = [torch.randint(0, 1 << 16, (min(largest, SLICE),), dtype=torch.int32) for _moment in range(2)]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group, noise)

    def _update(self, param: nn.Parameter, group: dict, noise: list[torch.Tensor]) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
        for key in ("exp_avg", "exp_avg_sq"):  # a resumed run's moments load as fp32 (exactly the bf16 values)
            state[key] = state[key].to(torch.bfloat16)
        state["step"] += 1
        step = int(state["step"].item())
        (beta1, beta2), lr = group["betas"], group["lr"]
        param.mul_(1 - lr * group["weight_decay"])
        flat = [t.view(-1) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])]
        for start in range(0, param.numel(), SLICE):  # fp32 temporaries of one slice at a time
            weight, grad, exp_avg_bf16, exp_avg_sq_bf16 = (t[start : start + SLICE] for t in flat)
            grad = grad.float()
            exp_avg = exp_avg_bf16.float().lerp_(grad, 1 - beta1)
            exp_avg_sq = exp_avg_sq_bf16.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            exp_avg_bf16.copy_(round_stochastically(exp_avg, noise[0]))
            exp_avg_sq_bf16.copy_(round_stochastically(exp_avg_sq, noise[1]))
            denom = exp_avg_sq.div_(1 - beta2**step).sqrt_().add_(group["eps"])
            weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def round_stochastically(value: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` (fp32, 1-D) rounded to bf16, up or down with probabilities that make it unbiased: random
    bits are added below the 16 bits bf16 keeps, then cut off (exact, the cut bits being zero). ``noise``:
    int32 uniform in [0, 2¹⁶), at least as long as ``value`` (drawn here when not given)."""
    bits = value.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16) if noise is None else noise[: bits.numel()]
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)
