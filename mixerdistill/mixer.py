"""The SequenceMixer interface: what a student layer must provide to replace attention.

Layout conventions used everywhere in mixerdistill:
  hidden states  (B, T, D)        B batch, T tokens, D model width
  per-head data  (B, T, H, ·)     H heads
  mixing matrix  (B, H, T, T)     row i mixes tokens j ≤ i into token i

Every mixer can be written as ``y = M(u) · v``. ``mixing_matrix`` materialises M (stage 1 of MOHAWK,
``inspect``), ``forward`` is the fast path (chunked / kernel), and ``step`` is constant-memory recurrent
decoding. ``materialised_forward`` computes the output through M so tests can check all three agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

State = dict[str, torch.Tensor]
"""A mixer's recurrent state: named tensors whose sizes do not depend on the sequence length
(except for softmax attention, whose state is its KV cache)."""

MatrixRows = Callable[[int, int], torch.Tensor]
"""``rows(start, stop)`` → M[:, :, start:stop, :stop], (B, H, stop − start, stop): a block of query rows of a
mixing matrix over the columns a causal row block can reach (everything right of ``stop`` is zero)."""

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor] | None
"""The teacher's rotary (cos, sin), each (B, T, rotary_dim), or None for families without RoPE."""


class MixerConfig(BaseModel):
    """Base of every mixer's pydantic ``Config``; the recipe's ``student.mixer`` block is validated by it."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class QKNorm:
    """A norm the teacher applies to q and k after projection, before RoPE (Qwen3, OLMo2, Gemma 3).

    ``scope`` "head": over each head's d dims with one (d,) weight shared by all heads (Qwen3, Gemma 3);
    "projection": over all heads' H·d dims at once with an (H·d,) weight (OLMo2).
    y = x / sqrt(mean(x²) + eps) · (offset + w): Gemma stores w − 1, so its offset is 1.
    """

    scope: str = "head"  # "head" | "projection"
    eps: float = 1e-6
    offset: float = 0.0

    def __post_init__(self):
        if self.scope not in ("head", "projection"):
            raise ValueError(f"QKNorm.scope must be 'head' or 'projection', not {self.scope!r}")


@dataclass(frozen=True)
class AttentionGeometry:
    """The shape of one teacher attention layer, which a student mixer must fit into, and what the teacher
    does between its projections (norms, rotary, scale, soft-capping, window)."""

    hidden_size: int  # D
    num_heads: int  # H (query heads)
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int  # per-head width of q, k, v
    rotary_dim: int  # how many leading dims of each head get RoPE (Phi: partial rotary); 0 = none
    layer_idx: int
    attention_bias: bool = False  # q/k/v projections carry biases
    output_bias: bool = False  # output projection carries a bias
    softmax_scale: float | None = None  # None means 1/sqrt(head_dim)
    rotary_interleaved: bool = False  # RoPE rotates pairs (2i, 2i+1) (Cohere), not halves
    qk_norm: QKNorm | None = None  # a norm on q and k before RoPE
    logit_softcap: float | None = None  # scores → cap·tanh(scores/cap) before the softmax (Gemma 2)
    sliding_window: int | None = None  # query i sees keys j with i − j < window (Mistral, Gemma 2/3)

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim**-0.5

    @property
    def query_groups(self) -> int:
        """Query heads per key/value head (1 without GQA); ValueError when they do not divide."""
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} kv heads")
        return self.num_heads // self.num_kv_heads


@dataclass
class AttentionWeights:
    """A teacher attention layer's projections in (out_features, in_features) layout.

    q: (H·d, D)   k, v: (H_kv·d, D)   o: (D, H·d); biases are None when the family has none.
    q_norm, k_norm: the weights of the geometry's ``qk_norm`` ((d,) per head, or (H·d,) / (H_kv·d,)
    over the projection), None without one.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def fold_qk_norm(weights: AttentionWeights, geometry: AttentionGeometry) -> AttentionWeights:
    """``weights`` with what is linear of the geometry's q/k norm folded into the q and k projections: the
    norm's elementwise gain (offset + w) scales each output row and bias. For mixers that map q → C and
    k → B (or copy q and k). The norm's division by each token's root mean square is not linear and cannot
    be folded into a projection, so such a student starts from q and k up to that per-token, per-head
    factor, which stages 1–2 learn around. Without a q/k norm, ``weights`` itself.
    """
    norm = geometry.qk_norm
    if norm is None:
        return weights
    gains = []
    for projection, gain in ((weights.q, weights.q_norm), (weights.k, weights.k_norm)):
        gain = norm.offset + gain
        gains.append(gain.repeat(projection.shape[0] // gain.numel()))  # per head: one (d,) gain for every head
    q_gain, k_gain = gains
    return replace(
        weights,
        q=weights.q * q_gain[:, None],
        k=weights.k * k_gain[:, None],
        q_bias=None if weights.q_bias is None else weights.q_bias * q_gain,
        k_bias=None if weights.k_bias is None else weights.k_bias * k_gain,
        q_norm=None,
        k_norm=None,
    )


class SequenceMixer(nn.Module):
    """Base class of every student (and teacher-side) sequence mixer.

    Subclasses set ``Config`` (a ``MixerConfig``) and implement the abstract methods below (of
    ``mixing_matrix`` and ``matrix_rows``, one: each defaults to the other). Their constructor takes
    ``(geometry: AttentionGeometry, config: Config | None)``; None means ``Config()``.
    """

    Config: ClassVar[type[MixerConfig]] = MixerConfig
    state_grows: ClassVar[bool] = False
    """True for mixers whose state grows with the tokens seen (softmax attention's KV cache)."""

    def __init__(self, geometry: AttentionGeometry, config: MixerConfig | None = None):
        super().__init__()
        self.geometry = geometry
        self.config = config if config is not None else self.Config()

    @classmethod
    def part_classes(cls, config: MixerConfig) -> dict[str, type[SequenceMixer]]:
        """The mixer classes, by registered name, that this mixer builds from its ``config`` (a composite's
        parts; none for others). ``mixerdistill export`` ships their code and hands them back, as
        ``config.mixer_classes``, to the exported model, which has no plugin registry."""
        return {}

    # -- the fast path -------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → (B, T, D) output and the state after the last token.

        With ``state`` given, the sequence continues from it (chunked prefill after a prefix).
        """
        raise NotImplementedError

    # -- the matrix view -----------------------------------------------------------------------
    def mixing_matrix(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → M (B, H, T, T), lower-triangular, such that the pre-projection output is M @ v.

        Default: every row of ``matrix_rows`` at once (for mixers that implement that one)."""
        if type(self).matrix_rows is SequenceMixer.matrix_rows:
            raise NotImplementedError(f"{type(self).__name__} implements neither mixing_matrix nor matrix_rows")
        return self.matrix_rows(hidden_states, rotary)(0, hidden_states.shape[1])

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → a ``MatrixRows`` function over this input's mixing matrix (stage 1's blockwise loss).

        Default: materialises M once and slices it, which saves no memory. Mixers override it to keep only
        per-token factors (O(T) memory) and build each row block on demand.
        """
        matrix = self.mixing_matrix(hidden_states, rotary)
        return lambda start, stop: matrix[:, :, start:stop, :stop]

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → (B, T, D) computed from what ``self.mixing_matrix`` returns (the conformance check
        substitutes that matrix); equals ``forward`` up to float error."""
        raise NotImplementedError

    def matrix_parameters(self) -> list[nn.Parameter]:
        """Parameters that shape M: the ones stage 1 trains. Default: all of them."""
        return list(self.parameters())

    # -- recurrent decoding --------------------------------------------------------------------
    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """The state before the first token."""
        raise NotImplementedError

    def zero_state(
        self, shapes: dict[str, tuple[int, ...]], device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """{name: zeros of shape} on ``device`` / in ``dtype``, by default those of the mixer's parameters."""
        reference = next(self.parameters())
        return {
            name: torch.zeros(shape, device=device or reference.device, dtype=dtype or reference.dtype)
            for name, shape in shapes.items()
        }

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token: (B, D) and state → (B, D) output and the next state. ``rotary`` is (B, rotary_dim) pairs."""
        raise NotImplementedError

    # -- construction from a teacher -----------------------------------------------------------
    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: MixerConfig
    ) -> SequenceMixer:
        """A mixer initialised from a teacher attention layer. Default: a fresh mixer (no transfer)."""
        return cls(geometry, config)

    def require_teacher_shapes(self, **sizes: tuple[int, int]) -> None:
        """For ``from_attention``: raise one ValueError naming every ``name=(value, needed)`` that differs,
        e.g. ``require_teacher_shapes(d_state=(self.d_state, geometry.head_dim))``."""
        wrong = [f"{name}={value} (needs {needed})" for name, (value, needed) in sizes.items() if value != needed]
        if wrong:
            raise ValueError(
                f"{type(self).__name__}.from_attention copies the teacher's projections, which fixes "
                f"{', '.join(sizes)}; got {', '.join(wrong)} (leave them unset to take the teacher's)"
            )

    def extra_repr(self) -> str:
        fields: dict[str, Any] = self.config.model_dump()
        return ", ".join(f"{k}={v}" for k, v in fields.items())


def copy_projection(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy a teacher projection into ``linear`` (no grad); a bias the teacher lacks becomes 0."""
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))


def repeat_kv_rows(geometry: AttentionGeometry, weight: torch.Tensor) -> torch.Tensor:
    """(H_kv·d, D) → (H·d, D), or a bias (H_kv·d,) → (H·d,): a k/v projection repeated for grouped-query
    attention, as transformers' ``repeat_kv`` does (kv head g serves query heads g·H/H_kv … (g+1)·H/H_kv − 1)."""
    d, groups = geometry.head_dim, geometry.query_groups
    return weight.unflatten(0, (geometry.num_kv_heads, d)).repeat_interleave(groups, dim=0).flatten(0, 1)
