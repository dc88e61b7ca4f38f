"""Losses over the vocabulary computed a chunk of tokens at a time, so (B·T, V) logits never exist whole.

A (4·256, 262,144) fp32 logits tensor (Gemma 3) is 1 GB, and a loss over it keeps several of its size
(log-softmax of student and teacher, the gradient). Here the model runs up to its final norm once, and
the LM head, the family's logit scaling and the loss run on a chunk of tokens at a time (256, fewer for
vocabularies above 65,536); each chunk's gradient is computed with its loss and its logits freed, so the
peak holds a few (chunk, V) tensors of at most 64 MB whatever B·T is (scoring without gradients: two of at
most 256 MB).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ELEMENTS = 1 << 24  # one (chunk, V) fp32 tensor: 64 MB
# Scoring without gradients holds two such tensors (logits, log-softmax) instead of several: chunks 4× larger,
# which read the LM head a quarter as often (Gemma 3's 8-bit head: an evaluation 1.3× faster).
EVAL_CHUNK_ELEMENTS = 1 << 26
MAX_CHUNK_TOKENS = 256


def chunk_tokens_for(vocab_size: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: 256, or fewer where (256, V) would exceed ``elements`` (Gemma 3's 262,144: 64 when
    training, 256 when scoring)."""
    return max(1, min(MAX_CHUNK_TOKENS, elements // vocab_size))


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids → (B, T, D): the decoder's output after its final norm, before the LM head."""
    return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(…, D) final hidden states → (…, V) logits as the model's own forward computes them: the LM head,
    then the family's scaling (Cohere's ``logit_scale``, Granite's ``logits_scaling``) and soft-capping
    (Gemma 2/3's ``final_logit_softcapping``). ``check_adapter`` checks it against every family's forward."""
    config = model.config
    logits = model.get_output_embeddings()(hidden)
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def chunk_kd(
    student: nn.Module,
    teacher: nn.Module,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: (n, D) hidden states and (n,) next tokens (−100: none) → (Σ KL(teacher ‖ student) at
    ``temperature``, Σ cross-entropy of the student on ``targets``)."""
    student_logits = logits_from_hidden(student, student_hidden).float()
    with torch.no_grad():
        teacher_log_probs = F.log_softmax(_scaled(logits_from_hidden(teacher, teacher_hidden).float(), temperature), -1)
    return _kd_sums(student_logits, teacher_log_probs, targets, temperature)


def _kd_sums(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) fp32 student logits, the teacher's (n, V) log-probabilities at ``temperature`` and (n,) next
    tokens → (Σ KL(teacher ‖ student) at ``temperature``, Σ cross-entropy of the student on ``targets``)."""
    student_log_probs = F.log_softmax(_scaled(student_logits, temperature), dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
    plain_log_probs = student_log_probs if temperature == 1 else F.log_softmax(student_logits, dim=-1)
    return kl, F.nll_loss(plain_log_probs, targets, reduction="sum", ignore_index=-100)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; at temperature 1 the logits themselves (no (n, V) copy, 67 MB for Gemma 3)."""
    return logits if temperature == 1 else logits / temperature


class DistillationLoss(NamedTuple):
    """``loss`` = kd_weight · kl + ce_weight · ce, with the student's gradient; ``kl`` (KL(teacher ‖ student)
    per token × temperature²) and ``ce`` (next-token cross-entropy per predicted token) detached, for metrics."""

    loss: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor


def chunked_distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    temperature: float,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int | None = None,
) -> DistillationLoss:
    """(B, T) ids → the distillation loss, the vocabulary handled ``chunk_tokens`` at a time (default:
    ``chunk_tokens_for`` the vocabulary).

    With gradients, each chunk's gradient (for the final hidden states and a trainable LM head) is computed
    as soon as its loss is, and the chunk's logits are freed: the backward pass only hands the stored
    gradients on. Recomputing each chunk in the backward (activation checkpointing) would need the same
    memory and two more (chunk, V) matmuls per chunk, the teacher's and the student's LM head again."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100).flatten()  # the last token predicts nothing
    predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)
    kl_scale, ce_scale = temperature**2 / len(targets), 1 / predicted
    if _fully_sharded(student):
        kl, ce = _whole_logits_loss(student, teacher, input_ids, targets, temperature)
        kl, ce = kl * kl_scale, ce * ce_scale
        return DistillationLoss(kd_weight * kl + ce_weight * ce, kl.detach(), ce.detach())
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, input_ids).flatten(0, 1)
    student_hidden = final_hidden(student, input_ids).flatten(0, 1)  # (B·T, D)
    head = (
        [p for p in student.get_output_embeddings().parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    )
    differentiable = student_hidden.requires_grad or bool(head)
    hidden_grad = torch.zeros_like(student_hidden) if differentiable else None
    head_grads: list[torch.Tensor | None] = [None] * len(head)
    chunk_tokens = chunk_tokens or chunk_tokens_for(student.config.vocab_size)
    kl = ce = student_hidden.new_zeros(())
    for start in range(0, len(targets), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        with torch.enable_grad() if differentiable else torch.no_grad():
            hidden = student_hidden[piece].detach().requires_grad_(differentiable)
            chunk_kl, chunk_ce = chunk_kd(student, teacher, hidden, teacher_hidden[piece], targets[piece], temperature)
            if differentiable:
                objective = kd_weight * kl_scale * chunk_kl + ce_weight * ce_scale * chunk_ce
                grads = torch.autograd.grad(objective, [hidden, *head])
                hidden_grad[piece] = grads[0]
                head_grads = [g if total is None else total.add_(g) for total, g in zip(head_grads, grads[1:])]
        kl, ce = kl + chunk_kl.detach(), ce + chunk_ce.detach()
    kl, ce = kl * kl_scale, ce * ce_scale
    value = kd_weight * kl + ce_weight * ce
    if differentiable:
        value = _WithGradients.apply(value, [hidden_grad, *head_grads], student_hidden, *head)
    return DistillationLoss(value, kl, ce)


class _WithGradients(torch.autograd.Function):
    """A scalar whose gradients for ``inputs`` were computed with it: the backward hands them on, scaled by
    the incoming gradient (autograd.Function: ``apply(value, gradients, *inputs)``)."""

    @staticmethod
    def forward(ctx, value, gradients, *inputs):
        ctx.gradients = gradients
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        gradients, ctx.gradients = ctx.gradients, None  # handed on once: no second copy of an LM head's gradient
        return (None, None, *(g.mul_(grad_output) if g is not None else None for g in gradients))


def _fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module, whose root parameters (embeddings, final norm, LM head) are
    gathered only by the hooks of its own forward: calling its parts directly would see shards."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _whole_logits_loss(
    student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ KL, Σ cross-entropy) as ``chunk_kd`` gives them, for fully sharded models: both go through their own
    forward, (B·T, V) logits at once (the memory the chunks save is spread over the ranks' shards instead)."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits.flatten(0, 1).float()
        teacher_log_probs = F.log_softmax(_scaled(teacher_logits, temperature), -1)
    student_logits = student(input_ids=input_ids, use_cache=False).logits.flatten(0, 1).float()
    return _kd_sums(student_logits, teacher_log_probs, targets, temperature)


@torch.no_grad()
def next_token_nll(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int | None = None) -> float:
    """(B, T) ids → the summed next-token negative log-likelihood of the B·(T − 1) predictions."""
    targets = input_ids[:, 1:].flatten()
    if _fully_sharded(model):
        logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].flatten(0, 1).float()
        return F.cross_entropy(logits, targets, reduction="sum").item()
    hidden = final_hidden(model, input_ids)[:, :-1].flatten(0, 1)
    chunk_tokens = chunk_tokens or chunk_tokens_for(model.config.vocab_size, EVAL_CHUNK_ELEMENTS)
    total = 0.0
    for start in range(0, len(targets), chunk_tokens):
        logits = logits_from_hidden(model, hidden[start : start + chunk_tokens]).float()
        total += F.cross_entropy(logits, targets[start : start + chunk_tokens], reduction="sum").item()
    return total
