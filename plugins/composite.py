"""The ``sum`` mixer: several registered mixers side by side on the same input, their outputs added.

    y = Σ_p s_p · part_p(u)          M = Σ_p s_p · M_p          state = every part's state

For example sliding-window attention of 64 tokens (exact local attention) beside a discrete Mamba-2 (a
decaying summary of everything before), as in the hybrids of LoLCATs and Liger. Each part keeps its own
projections and is transferred from the teacher by its own ``from_attention``, so at transfer every part
alone approximates the teacher's attention output.

The scales s_p (one learned scalar per part) decide how the parts start. A plain sum of two transferred
parts would start near twice the attention output; instead s = (1, 0, …, 0) by default, so the composite
starts as its first part (with window attention: exactly the teacher's attention over the last W tokens)
and the other parts enter as residual branches whose scale is learnt from zero (ReZero's start). Their own
parameters still learn from the first step: Adam's update does not depend on the gradient's size. LoLCATs'
joint softmax normalisation of the window and linear-attention scores would tie the parts' internals
together; a scale per part keeps any registered mixer usable as a part.

The mixing matrix is the scaled sum of the parts' matrices (exact when the parts share values and output
projections, as they do right after transfer), so stage 1 compares Σ_p s_p M_p with the teacher's
attention unchanged. The state's keys are the parts' keys prefixed with the part's index ("0.k", "1.ssm");
parts whose state grows with the tokens (softmax attention's KV cache) are refused: use
``window_attention``. An exported model builds the parts from the classes the export ships beside it
(``part_classes``), without the plugin registry.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import nn

from mixerdistill.errors import UserError
from mixerdistill.hookspecs import hookimpl
from mixerdistill.mixer import (
    AttentionGeometry,
    AttentionWeights,
    MatrixRows,
    MixerConfig,
    RotaryEmbedding,
    SequenceMixer,
    State,
)
from mixerdistill.plugins import get_mixer, suggest


def _part_errors(index: int, name: str, error: ValidationError, config_cls) -> list[InitErrorDetails]:
    """A part's Config errors, located at ``index`` (pydantic adds ``parts``); unknown keys get a suggestion."""
    details = []
    for problem in error.errors():
        if problem["type"] == "extra_forbidden":
            key, allowed = str(problem["loc"][-1]), list(config_cls.model_fields)
            hint = f"unknown field '{key}' of mixer '{name}'{suggest(key, allowed)}; allowed: {', '.join(allowed)}"
            problem = {**problem, "type": PydanticCustomError("unknown_field", hint)}
        details.append(
            {
                "type": problem["type"],
                "loc": (index, *problem["loc"]),
                "input": problem["input"],
                "ctx": problem.get("ctx", {}),
            }
        )
    return details


def _part_class(part: Any) -> tuple[str, type[SequenceMixer]]:
    """The registered name and mixer class of one part; ValueError saying what is wrong with it."""
    if not isinstance(part, dict) or not isinstance(part.get("name"), str):
        raise ValueError("each part is a mixer block: {name: MIXER, its Config fields}")
    try:
        mixer_cls = get_mixer(part["name"])
    except UserError as error:
        raise ValueError(str(error)) from None
    if mixer_cls.state_grows:
        raise ValueError(f"'{part['name']}' keeps a state that grows with the tokens; use window_attention")
    return part["name"], mixer_cls


class SumMixer(SequenceMixer):
    """Registered mixers added together, each weighted by a learned scale starting at (1, 0, …) (docs/hybrids.md)."""

    class Config(MixerConfig):
        parts: list[dict[str, Any]] = Field(
            min_length=2,
            description="The mixers added together, each a block like student.mixer: {name: MIXER, its "
            "Config fields}, e.g. [{name: window_attention, window: 64}, {name: discrete_mamba2}]",
        )
        scales: list[float] | None = Field(
            None,
            description="Initial scale of each part's output and matrix; null: 1 for the first part, 0 for "
            "the others (the composite starts as its first part)",
        )

        @field_validator("parts")
        @classmethod
        def _parts_valid(cls, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """Each part validated by its own mixer's Config; returned with every default filled in."""
            resolved, details = [], []
            for index, part in enumerate(parts):
                try:
                    name, mixer_cls = _part_class(part)
                except ValueError as error:
                    details.append(
                        {
                            "type": PydanticCustomError("part", str(error)),
                            "loc": (index, "name"),
                            "input": part.get("name") if isinstance(part, dict) else part,
                        }
                    )
                    continue
                options = {key: value for key, value in part.items() if key != "name"}
                try:
                    resolved.append({"name": name, **mixer_cls.Config.model_validate(options).model_dump(mode="json")})
                except ValidationError as error:
                    details += _part_errors(index, name, error, mixer_cls.Config)
            if details:
                raise ValidationError.from_exception_data("sum", details)
            return resolved

        @model_validator(mode="after")
        def _one_scale_per_part(self):
            if self.scales is not None and len(self.scales) != len(self.parts):
                raise ValueError(f"scales: {len(self.scales)} given for {len(self.parts)} parts")
            return self

        def part_configs(self) -> list[tuple[type[SequenceMixer], MixerConfig]]:
            """(mixer class, validated Config) of every part, in order."""
            specs = []
            for part in self.parts:
                mixer_cls = get_mixer(part["name"])
                options = {key: value for key, value in part.items() if key != "name"}
                specs.append((mixer_cls, mixer_cls.Config.model_validate(options)))
            return specs

    def __init__(self, geometry: AttentionGeometry, config: Config | None = None):
        super().__init__(geometry, config)
        self.parts = nn.ModuleList(part_cls(geometry, options) for part_cls, options in self._part_specs())
        scales = self.config.scales
        self.scales = nn.Parameter(
            torch.tensor(scales if scales is not None else [1.0] + [0.0] * (len(self.parts) - 1))
        )

    def _part_specs(self) -> list[tuple[type[SequenceMixer], Any]]:
        """(mixer class, options) of every part: validated through the registry in mixerdistill; in an exported
        model (plain options) from the classes the export shipped, ``config.mixer_classes``."""
        if hasattr(self.config, "part_configs"):
            return self.config.part_configs()
        options_cls = type(self.config)
        return [
            (self.config.mixer_classes[part["name"]], options_cls(**{k: v for k, v in part.items() if k != "name"}))
            for part in self.config.parts
        ]

    @classmethod
    def part_classes(cls, config: Config) -> dict[str, type[SequenceMixer]]:
        """Every part's mixer class by its registered name (what an export ships beside this one)."""
        return {part["name"]: get_mixer(part["name"]) for part in config.parts}

    @staticmethod
    def _part_state(state: State | None, index: int) -> State | None:
        """Part ``index``'s entries of the composite ``state``, without their prefix."""
        if state is None:
            return None
        prefix = f"{index}."
        return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}

    def forward(
        self, hidden_states: torch.Tensor, state: State | None = None, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """(B, T, D) → Σ_p s_p · part_p (B, T, D) and every part's state, keys prefixed "p."."""
        output, new_state = 0.0, {}
        for index, part in enumerate(self.parts):
            part_output, part_state = part(hidden_states, state=self._part_state(state, index), rotary=rotary)
            output = output + self.scales[index] * part_output
            new_state.update({f"{index}.{key}": value for key, value in part_state.items()})
        return output, new_state

    def matrix_rows(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> MatrixRows:
        """(B, T, D) → rows(start, stop) of Σ_p s_p M_p (B, H, stop − start, stop), from each part's rows."""
        rows = [part.matrix_rows(hidden_states, rotary) for part in self.parts]

        def block(start: int, stop: int) -> torch.Tensor:
            pieces = [part_rows(start, stop) for part_rows in rows]
            if len({piece.shape for piece in pieces}) > 1:
                shapes = ", ".join(str(tuple(piece.shape)) for piece in pieces)
                raise ValueError(f"the sum mixer's parts have mixing matrices of different shapes: {shapes}")
            return sum(scale * piece for scale, piece in zip(self.scales, pieces))

        return block

    def materialised_forward(self, hidden_states: torch.Tensor, rotary: RotaryEmbedding = None) -> torch.Tensor:
        """(B, T, D) → (B, T, D) through ``self.mixing_matrix``: the first part computes through
        (M − Σ_{p>0} s_p M_p) / s_0, its own matrix unless M was substituted; the others through theirs."""
        others = [
            scale * part.mixing_matrix(hidden_states, rotary) for scale, part in zip(self.scales[1:], self.parts[1:])
        ]
        first_matrix = (self.mixing_matrix(hidden_states, rotary) - sum(others)) / self.scales[0]
        first = self.parts[0]
        first.mixing_matrix = lambda *args, **kwargs: first_matrix  # an instance attribute shadows the method
        try:
            output = self.scales[0] * first.materialised_forward(hidden_states, rotary)
        finally:
            del first.mixing_matrix
        for scale, part in zip(self.scales[1:], self.parts[1:]):
            output = output + scale * part.materialised_forward(hidden_states, rotary)
        return output

    def matrix_parameters(self) -> list[nn.Parameter]:
        """The scales and every part's matrix parameters."""
        return [self.scales, *(p for part in self.parts for p in part.matrix_parameters())]

    def init_state(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Every part's initial state, keys prefixed with the part's index."""
        return {
            f"{index}.{key}": value
            for index, part in enumerate(self.parts)
            for key, value in part.init_state(batch_size, device, dtype).items()
        }

    def step(
        self, hidden_state: torch.Tensor, state: State, rotary: RotaryEmbedding = None
    ) -> tuple[torch.Tensor, State]:
        """One token (B, D) → Σ_p s_p · part_p.step (B, D) and the next state."""
        output, new_state = 0.0, {}
        for index, part in enumerate(self.parts):
            part_output, part_state = part.step(hidden_state, self._part_state(state, index), rotary=rotary)
            output = output + self.scales[index] * part_output
            new_state.update({f"{index}.{key}": value for key, value in part_state.items()})
        return output, new_state

    @classmethod
    def from_attention(
        cls, weights: AttentionWeights, geometry: AttentionGeometry, config: Config | None = None
    ) -> SumMixer:
        """Every part from its own ``from_attention`` (a part that refuses refuses the whole); the scales
        start at ``config.scales``. The teacher's output bias is in every part, once in the sum at the
        default scales (1, 0, …)."""
        mixer = cls(geometry, config)
        parts = [part_cls.from_attention(weights, geometry, options) for part_cls, options in mixer._part_specs()]
        mixer.parts = nn.ModuleList(parts)
        return mixer


@hookimpl
def register_mixers(register):
    register("sum", SumMixer)
