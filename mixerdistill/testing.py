"""Test helpers for mixers, as a pytest plugin (loaded automatically once mixerdistill is installed).

``check_mixer(MixerClass)`` is the conformance check every mixer must pass; a plugin author calls it from
their own tests. It builds the mixer on a tiny attention geometry in float64, perturbs its parameters
away from any special initialisation, and asserts that

  * ``mixing_matrix`` is (B, H, T, T), finite and zero above the diagonal, and ``matrix_rows`` blocks
    (stage 1's blockwise loss) are its slices;
  * ``materialised_forward`` computes through ``mixing_matrix``: the check hands it the matrix it has just
    checked (and a copy with one entry changed, which must change exactly the output token of that row),
    so a correct output cannot hide a wrong matrix;
  * ``forward``, ``materialised_forward`` and a loop of ``step`` give the same outputs;
  * the state after ``forward`` equals the state after the ``step`` loop, key by key and shape by shape,
    and (unless ``state_grows``) has the shapes of ``init_state``: constant memory;
  * ``forward`` continues from a state: two calls on a split sequence equal one call on all of it;
  * all of the above at the given length and at lengths just below, at and above the first two multiples
    of every chunk size in the config (integer fields whose name contains 'chunk');
  * gradients flow: every parameter gets a finite gradient from ``forward``, the same one as through
    ``materialised_forward``; a loss on ``mixing_matrix`` reaches some of ``matrix_parameters`` and no
    parameter outside them;
  * ``from_attention`` on random teacher weights (grouped-query heads; every combination of q/k/v and output
    biases) returns the class with a fresh mixer's parameter shapes, finite values, depends on the weights
    when overridden, and the transferred mixer passes every check above at the default length. A
    ``ValueError`` is accepted as the mixer refusing a config that cannot take a transfer, and recorded in
    the report.

A failure names the method that is most likely wrong: when two of the three paths agree, the third.

Fixtures: ``tiny_geometry`` (the geometry the check uses), ``tiny_teacher`` (a random 2-layer Llama,
grouped-query attention, byte-sized vocabulary) and ``register_plugin`` (registers a plugin object or
module in the process-wide plugin manager for one test, so recipes run in-process can name its mixers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

GEOMETRY = dict(
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rotary_dim=8,
    layer_idx=0,
    attention_bias=False,
    output_bias=True,
)


NEGLIGIBLE = 1e-6
"""References with a smaller norm are compared absolutely, scaled by this: float64 noise around a true 0."""


def tiny_geometry_value():
    from mixerdistill.mixer import AttentionGeometry

    return AttentionGeometry(**GEOMETRY)


def rotary_for(length: int, rotary_dim: int, batch: int, dtype):
    """(cos, sin), each (B, T, rotary_dim), in transformers' half-split RoPE convention; None for rotary_dim 0."""
    import torch

    if rotary_dim == 0:
        return None
    inverse = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None, :]
    angles = torch.cat([angles, angles], dim=-1).to(dtype)  # (T, rotary_dim)
    return angles.cos().expand(batch, -1, -1), angles.sin().expand(batch, -1, -1)


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ (absolute when the reference is 0); integer tensors: 0 or inf."""
    if not expected.is_floating_point():
        return 0.0 if actual.equal(expected) else float("inf")
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


@dataclass
class ConformanceReport:
    """What ``check_mixer`` measured; every error is relative to the reference's scale.

    ``errors`` labels carry the context: 'T=65: forward vs step', 'from_attention(attention_bias=True,
    output_bias=False): …'; the plain labels are the default length. ``transfers`` says, per bias
    combination, 'checked' or why ``from_attention`` refused (a ValueError).
    """

    mixer: str
    lengths: list[int] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    state_shapes: dict[str, tuple] = field(default_factory=dict)
    transfers: dict[str, str] = field(default_factory=dict)


def chunk_lengths(config) -> list[int]:
    """Sequence lengths just below, at and just above a chunk, and above two chunks, for every chunk size in ``config``
    (integer fields whose name contains 'chunk'), so chunked paths cross chunk boundaries."""
    sizes = [
        value
        for key, value in config.model_dump().items()
        if "chunk" in key and isinstance(value, int) and not isinstance(value, bool) and value > 0
    ]
    return sorted({n for q in sizes for n in (q - 1, q, q + 1, 2 * q + 1) if n > 1})


def random_attention_weights(geometry, generator, dtype):
    """Random teacher projections for ``geometry`` (an ``AttentionWeights``), with the biases it declares."""
    import torch

    from mixerdistill.mixer import AttentionWeights

    g, width, kv_width = geometry, geometry.num_heads * geometry.head_dim, geometry.num_kv_heads * geometry.head_dim

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype) * shape[-1] ** -0.5

    biases = {}
    if g.attention_bias:
        biases.update(q_bias=draw(width), k_bias=draw(kv_width), v_bias=draw(kv_width))
    if g.output_bias:
        biases["o_bias"] = draw(g.hidden_size)
    return AttentionWeights(
        q=draw(width, g.hidden_size),
        k=draw(kv_width, g.hidden_size),
        v=draw(kv_width, g.hidden_size),
        o=draw(g.hidden_size, width),
        **biases,
    )


class _Checker:
    """The checks of ``check_mixer`` on one mixer instance; ``context`` prefixes every label and message."""

    def __init__(self, mixer, report: ConformanceReport, *, batch: int, cut: int, tolerance: float, context: str = ""):
        self.mixer, self.report, self.batch, self.cut, self.tolerance = mixer, report, batch, cut, tolerance
        self.context = context
        self.name = report.mixer

    def fail(self, message: str):
        raise AssertionError(f"{self.name}: {self.context}{message}")

    def measure(self, label: str, actual, expected) -> float:
        if actual.shape != expected.shape:
            self.fail(f"{label}: shape {tuple(actual.shape)} ≠ {tuple(expected.shape)}")
        error = relative_error(actual, expected)
        if expected.is_floating_point() and expected.norm() < NEGLIGIBLE:  # e.g. a bias softmax cancels: noise
            error = (actual - expected).norm().item() / NEGLIGIBLE
        self.report.errors[self.context + label] = error
        return error

    def close(self, label: str, actual, expected, culprit: str = "") -> None:
        error = self.measure(label, actual, expected)
        if error > self.tolerance:
            self.fail(
                f"{label} differ by {error:.3g} (relative), tolerance {self.tolerance:g}"
                + (f"; {culprit}" if culprit else "")
            )

    def inputs(self, length: int):
        import torch

        u = torch.randn(self.batch, length, self.mixer.geometry.hidden_size, dtype=torch.float64)
        return u, rotary_for(length, self.mixer.geometry.rotary_dim, self.batch, torch.float64)

    def paths(self, length: int) -> None:
        """Matrix view, forward / materialised_forward / step, states and continuation at one length."""
        import torch

        mixer, batch = self.mixer, self.batch
        u, rotary = self.inputs(length)
        with torch.no_grad():
            M = mixer.mixing_matrix(u, rotary)
            if not (M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (length, length)):
                self.fail(
                    f"mixing_matrix must be (B, H, T, T) = ({batch}, H, {length}, {length}), got {tuple(M.shape)}"
                )
            if not torch.isfinite(M).all():
                self.fail("mixing_matrix has non-finite entries")
            if not torch.equal(M.triu(1), torch.zeros_like(M)):
                self.fail("mixing_matrix is not causal (entries above the diagonal)")
            rows = mixer.matrix_rows(u, rotary)
            for start, stop in ((0, min(3, length)), (min(3, length - 1), length), (length - 1, length)):
                self.close(
                    f"matrix_rows({start}, {stop}) vs mixing_matrix",
                    rows(start, stop),
                    M[:, :, start:stop, :stop],
                    "matrix_rows is likely wrong (mixing_matrix is the reference)",
                )

            out, state = mixer(u, rotary=rotary)
            if out.shape != u.shape:
                self.fail(f"forward must return (B, T, D), got {tuple(out.shape)}")
            materialised = self.through_matrix(u, rotary, M)
            stepped = mixer.init_state(batch, device=u.device, dtype=u.dtype)
            initial_shapes = {key: tuple(value.shape) for key, value in stepped.items()}
            outputs = []
            for t in range(length):
                token_rotary = None if rotary is None else tuple(r[:, t] for r in rotary)
                o_t, stepped = mixer.step(u[:, t], stepped, rotary=token_rotary)
                outputs.append(o_t)
            self.three_paths(length, out, materialised, torch.stack(outputs, dim=1))

            if not set(state) == set(stepped) == set(initial_shapes):
                self.fail(
                    f"state keys differ: forward {sorted(state)}, step {sorted(stepped)}, "
                    f"init_state {sorted(initial_shapes)}"
                )
            for key in state:
                self.close(
                    f"state '{key}' forward vs step",
                    state[key],
                    stepped[key],
                    "forward's or step's state update is likely wrong (their outputs agree)",
                )
                self.report.state_shapes[key] = tuple(state[key].shape)
                if not type(mixer).state_grows and tuple(state[key].shape) != initial_shapes[key]:
                    self.fail(
                        f"state '{key}' is {tuple(state[key].shape)} after {length} tokens but "
                        f"{initial_shapes[key]} from init_state (set state_grows = True if that is intended)"
                    )

            cut = min(self.cut, length - 1)
            first_rotary = None if rotary is None else tuple(r[:, :cut] for r in rotary)
            rest_rotary = None if rotary is None else tuple(r[:, cut:] for r in rotary)
            head, middle = mixer(u[:, :cut], rotary=first_rotary)
            tail, last = mixer(u[:, cut:], state=middle, rotary=rest_rotary)
            culprit = "forward ignores or misreads its state argument (one pass over all tokens is the reference)"
            self.close("forward continued from a state", torch.cat([head, tail], dim=1), out, culprit)
            for key in state:
                self.close(f"state '{key}' after continuing", last[key], state[key], culprit)

    def through_matrix(self, u, rotary, M):
        """materialised_forward with ``mixing_matrix`` answering ``M`` (the matrix checked above), after checking
        that it computes through that matrix: a change of M[i, j] (j < i) changes output token i, no earlier one."""
        import torch

        mixer = self.mixer
        substitute, calls = [M], []

        def spy(hidden_states, rotary=None):
            calls.append(hidden_states.shape)
            return substitute[0]

        mixer.mixing_matrix = spy  # an instance attribute shadows the method for this check only
        try:
            materialised = mixer.materialised_forward(u, rotary)
            if not calls:
                self.fail(
                    "materialised_forward does not call mixing_matrix: it must compute its output from the "
                    "matrix mixing_matrix returns, or a wrong matrix would pass unnoticed"
                )
            length = u.shape[1]
            if length > 1:
                i, j = length - 1, length // 2 - 1 if length > 2 else 0
                nudged = M.clone()
                nudged[:, :, i, j] += 1.0
                substitute[0] = nudged
                changed = (mixer.materialised_forward(u, rotary) - materialised).abs().amax(dim=(0, 2))  # (T,)
                if changed[:i].max() > 1e-12 or changed[i] <= 1e-12:
                    self.fail(
                        f"materialised_forward does not use the matrix mixing_matrix returns as M @ v: "
                        f"changing M[:, :, {i}, {j}] changed output tokens "
                        f"{torch.nonzero(changed > 1e-12).flatten().tolist()} instead of token {i}"
                    )
        finally:
            del mixer.mixing_matrix
        return materialised

    def three_paths(self, length: int, forward, materialised, stepped) -> None:
        """Compare the three outputs; on a mismatch, name the method the other two contradict."""
        pairs = {
            "forward vs materialised_forward": (forward, materialised),
            "forward vs step": (forward, stepped),
            "materialised_forward vs step": (materialised, stepped),
        }
        errors = {pair: self.measure(pair, *outputs) for pair, outputs in pairs.items()}
        bad = {pair for pair, error in errors.items() if error > self.tolerance}
        if not bad:
            return
        chunks = chunk_lengths(self.mixer.config)
        if bad == {"forward vs materialised_forward", "materialised_forward vs step"}:
            culprit = (
                "mixing_matrix (or materialised_forward) is likely wrong: forward and step agree, the matrix "
                "view does not"
            )
        elif bad == {"forward vs step", "materialised_forward vs step"}:
            culprit = "step (or init_state) is likely wrong: forward and materialised_forward agree"
        elif bad == {"forward vs materialised_forward", "forward vs step"}:
            culprit = "forward is likely wrong: materialised_forward and step agree" + (
                f" (T = {length} crosses a chunk boundary: chunk sizes give lengths {chunks})"
                if chunks and length > min(chunks)
                else ""
            )
        else:
            culprit = "forward, materialised_forward and step disagree with each other"
        pair = max(bad, key=errors.get)
        self.fail(f"{pair} differ by {errors[pair]:.3g} (relative), tolerance {self.tolerance:g}; {culprit}")

    def gradients(self, length: int) -> None:
        """Through forward and through the matrix, the same, finite and reaching every parameter; a loss on M
        reaches matrix_parameters() only."""
        import torch

        mixer = self.mixer
        u, rotary = self.inputs(length)
        weight = torch.randn_like(u)
        gradients = []
        for path in (lambda: mixer(u, rotary=rotary)[0], lambda: mixer.materialised_forward(u, rotary)):
            mixer.zero_grad(set_to_none=True)
            (path() * weight).sum().backward()
            gradients.append({n: p.grad for n, p in mixer.named_parameters()})
        for parameter_name, gradient in gradients[0].items():
            if gradient is None:
                self.fail(f"parameter '{parameter_name}' gets no gradient from forward")
            if not torch.isfinite(gradient).all():
                self.fail(f"parameter '{parameter_name}' has a non-finite gradient")
            self.close(
                f"gradient of '{parameter_name}' forward vs materialised",
                gradient,
                gradients[1][parameter_name],
                "forward's backward pass (a custom autograd function or kernel) is likely wrong: the outputs agree",
            )
        if not any(g.abs().sum() > 0 for g in gradients[0].values()):
            self.fail("every gradient is zero")

        mixer.zero_grad(set_to_none=True)
        mixer.mixing_matrix(u, rotary).square().sum().backward()
        matrix_ids = {id(p) for p in mixer.matrix_parameters()}
        reached = {n for n, p in mixer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        outside = sorted(n for n, p in mixer.named_parameters() if n in reached and id(p) not in matrix_ids)
        if outside:
            self.fail(f"{outside} shape the mixing matrix but are not in matrix_parameters()")
        if not reached:
            self.fail("no parameter shapes the mixing matrix (check matrix_parameters and mixing_matrix)")
        mixer.zero_grad(set_to_none=True)

    def everything(self, lengths: list[int]) -> None:
        """Every check at ``lengths`` (labels of all but the first carry 'T=…: '), gradients at the first."""
        context = self.context
        for index, length in enumerate(lengths):
            self.context = context + (f"T={length}: " if index else "")
            self.paths(length)
        self.context = context
        self.gradients(lengths[0])


def check_mixer(
    mixer_cls,
    config=None,
    geometry=None,
    *,
    batch: int = 2,
    length: int = 19,
    cut: int = 7,
    seed: int = 0,
    perturbation: float = 0.1,
    tolerance: float = 1e-6,
    transfer_check=None,
) -> ConformanceReport:
    """Run the conformance check on ``mixer_cls`` (see the module docstring); raises AssertionError on failure,
    naming the method that is most likely wrong.

    ``config`` defaults to ``mixer_cls.Config()``; ``geometry`` to ``tiny_geometry``. The paths are compared at
    ``length`` and, for every integer config field whose name contains 'chunk', just below, at and above its
    first two multiples. ``from_attention`` is run on random teacher weights for each combination of
    attention_bias and output_bias (grouped-query heads, as ``geometry``), and the transferred mixer must pass
    every check too; ``transfer_check(mixer, weights, geometry)``, if given, asserts what the mixer documents
    about its transfer. Runs in float64, where all paths agree to ~1e-12, so ``tolerance`` can be tight.
    """
    import dataclasses

    import torch

    geometry = geometry if geometry is not None else tiny_geometry_value()
    config = config if config is not None else mixer_cls.Config()
    report = ConformanceReport(mixer_cls.__name__, lengths=[length, *(n for n in chunk_lengths(config) if n != length)])
    options = {"batch": batch, "cut": cut, "tolerance": tolerance}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend (10x slower on a busy machine)
    try:
        torch.manual_seed(seed)
        mixer = mixer_cls(geometry, config).to(torch.float64)
        with torch.no_grad():
            for parameter in mixer.parameters():
                parameter.add_(perturbation * torch.randn_like(parameter))
        _Checker(mixer, report, **options).everything(report.lengths)

        generator = torch.Generator().manual_seed(seed)
        for attention_bias in (False, True):
            for output_bias in (False, True):
                transfer_geometry = dataclasses.replace(
                    geometry, attention_bias=attention_bias, output_bias=output_bias
                )
                label = f"from_attention(attention_bias={attention_bias}, output_bias={output_bias})"
                weights = random_attention_weights(transfer_geometry, generator, torch.float64)
                transferred = _transfer(mixer_cls, weights, transfer_geometry, config, label, report, generator)
                if transferred is None:
                    continue
                if transfer_check is not None:
                    transfer_check(transferred, weights, transfer_geometry)
                _Checker(transferred, report, context=f"{label}: ", **options).everything([length])
                report.transfers[label] = "checked"
    finally:
        torch.set_num_threads(threads)
    return report


def _transfer(mixer_cls, weights, geometry, config, label: str, report: ConformanceReport, generator):
    """``mixer_cls.from_attention`` in float64, checked for type, parameter shapes and finiteness, and (when
    overridden) for using the weights; None, recorded in the report, when it refuses with a ValueError."""
    import torch

    from mixerdistill.mixer import SequenceMixer

    name = report.mixer
    try:
        mixer = mixer_cls.from_attention(weights, geometry, config)
    except ValueError as refusal:  # the documented way to refuse a config that cannot take a transfer
        report.transfers[label] = f"refused: {refusal}"
        return None
    except Exception as error:
        raise AssertionError(f"{name}: {label} raised {type(error).__name__}: {error}") from error
    if not isinstance(mixer, mixer_cls):
        raise AssertionError(f"{name}: {label} returned a {type(mixer).__name__}, not a {name}")
    mixer = mixer.to(torch.float64)
    expected = {key: tuple(value.shape) for key, value in mixer_cls(geometry, config).state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in mixer.state_dict().items()}
    if actual != expected:
        differences = [
            f"'{key}' {actual.get(key, 'missing')} instead of {expected.get(key, 'absent')}"
            for key in sorted(expected.keys() | actual.keys())
            if actual.get(key) != expected.get(key)
        ]
        raise AssertionError(
            f"{name}: {label} changed parameter shapes: {', '.join(differences)} "
            f"(from_attention is wrong; a fresh {name} has the expected shapes)"
        )
    for parameter_name, parameter in mixer.named_parameters():
        if not torch.isfinite(parameter).all():
            raise AssertionError(f"{name}: {label} left non-finite values in '{parameter_name}'")
    if mixer_cls.from_attention.__func__ is not SequenceMixer.from_attention.__func__:
        u = torch.randn(2, 5, geometry.hidden_size, generator=generator, dtype=torch.float64)
        rotary = rotary_for(5, geometry.rotary_dim, 2, torch.float64)
        other = mixer_cls.from_attention(
            random_attention_weights(geometry, generator, torch.float64), geometry, config
        ).to(torch.float64)
        with torch.no_grad():
            same = torch.equal(mixer(u, rotary=rotary)[0], other(u, rotary=rotary)[0])
        if same:
            raise AssertionError(f"{name}: {label} ignores the teacher's weights (other weights, same mixer)")
    return mixer


@pytest.fixture
def tiny_geometry():
    """The AttentionGeometry ``check_mixer`` uses by default: D 32, 4 heads, 2 kv heads, head_dim 8, RoPE."""
    return tiny_geometry_value()


@pytest.fixture
def tiny_teacher():
    """A random LlamaForCausalLM: 2 layers, D 64, 4 heads / 2 kv heads, vocabulary 256 (bytes), eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def register_plugin():
    """``register_plugin(plugin, name="...")`` registers a plugin (module or object with ``register_*``
    hookimpls) in the process-wide manager for this test; it is unregistered afterwards."""
    from mixerdistill.plugins import get_manager

    manager = get_manager()
    names: list[str] = []

    def register(plugin, name: str = "test_plugin"):
        info = manager.register(plugin, name)
        if name not in manager.plugins:
            raise RuntimeError(f"plugin '{name}' failed to register (see the PluginWarning above)")
        names.append(name)
        return info

    yield register
    for name in names:
        manager.unregister(name)


# -- teacher adapters ------------------------------------------------------------------------------------

TINY_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    attn_implementation="eager",
)
GQA = dict(num_key_value_heads=2)
WINDOW = 6  # shorter than check_adapter's sequence, so sliding windows matter
TINY_CONFIGS: dict[str, dict] = {
    "llama": GQA,
    "mistral": {**GQA, "sliding_window": WINDOW},
    "qwen2": GQA,
    "qwen3": {**GQA, "head_dim": 16},
    "olmo2": GQA,
    "gemma": {**GQA, "head_dim": 16},
    "gemma2": {
        **GQA,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": WINDOW,
    },
    "gemma3_text": {
        **GQA,
        "head_dim": 16,
        "query_pre_attn_scalar": 24,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    },
    "granite": {
        **GQA,
        "attention_multiplier": 0.5,
        "residual_multiplier": 0.7,
        "embedding_multiplier": 2.0,
        "logits_scaling": 3.0,
    },
    "cohere": GQA,
    "phi": {"partial_rotary_factor": 0.5},
    "phi3": GQA,
    "gpt2": {"n_positions": 128},
    "gpt_neox": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
    "stablelm": {**GQA, "use_qkv_bias": True},
    "smollm3": {**GQA, "no_rope_layers": [1, 0, 1]},
}
"""Per ``model_type``: what a tiny random model of the family sets beyond ``TINY_BASE`` — the options that
make its attention differ from Llama's (GQA, windows shorter than the test sequence, scales, soft-capping,
partial or missing RoPE, biases)."""


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random fp32 CausalLM of ``model_type`` built from ``TINY_BASE`` + ``TINY_CONFIGS[model_type]`` +
    ``overrides``, in eval mode with gradients off."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY_BASE, **TINY_CONFIGS.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)


@dataclass
class AdapterReport:
    """What ``check_adapter`` measured: max |difference| per comparison (logits, traced tensors)."""

    model_type: str
    adapter: str
    differences: dict[str, float] = field(default_factory=dict)


def check_adapter(
    model_type: str,
    adapter=None,
    *,
    model=None,
    batch: int = 2,
    length: int = 12,
    new_tokens: int = 5,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> AdapterReport:
    """Assert that the all-``attention`` student built through a teacher adapter reproduces the teacher.

    Builds ``model`` (default: ``tiny_model(model_type)``) and the student whose every attention layer is
    mixerdistill's ``attention`` mixer transferred through ``adapter`` (default: the one registered for the
    model type), then asserts max |difference| ≤ ``tolerance`` (fp32) for

      * the logits of a full-sequence forward, and of ``mixerdistill.logits`` (final hidden state, then the
        LM head and the family's logit scaling) against the model's own;
      * every block's traced input and output, and every attention layer's input and output;
      * the logits of token-by-token decoding through the generation cache (the mixers' ``step``),
        against the teacher's full forward at each position; and the tokens of greedy ``generate``.

    Raises AssertionError naming the first comparison that fails (the transfer check's
    ``TransferMismatch`` when the adapter's view of a layer is wrong).
    """
    import torch
    from transformers import DynamicCache

    from mixerdistill.logits import final_hidden, logits_from_hidden
    from mixerdistill.plugins import get_mixer
    from mixerdistill.student import build_student, mixer_layers
    from mixerdistill.teacher import TRACE_FIELDS, find_adapter, trace_teacher

    teacher = model if model is not None else tiny_model(model_type, seed)
    adapter = adapter if adapter is not None else find_adapter(teacher.config)
    attention = get_mixer("attention")
    student = build_student(teacher, adapter, attention, attention.Config(), keep_attention=[])
    replaced = mixer_layers(student, adapter)
    assert len(replaced) == len(adapter.layers(teacher)), f"{model_type}: not every layer was replaced"
    report = AdapterReport(model_type, adapter.name)

    def close(label: str, actual, expected) -> None:
        where = f"{model_type} ({adapter.name}): {label}"
        assert actual.shape == expected.shape, f"{where}: shape {tuple(actual.shape)} ≠ {tuple(expected.shape)}"
        difference = (actual - expected).abs().max().item()
        report.differences[label] = difference
        assert difference <= tolerance, f"{where} differ by {difference:.3g}, tolerance {tolerance:g}"

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, teacher.config.vocab_size, (batch, length), generator=generator)
    with torch.no_grad():
        expected = trace_teacher(teacher, adapter, input_ids, record=set(TRACE_FIELDS), keep_logits=True)
        actual = trace_teacher(student, adapter, input_ids, record=set(TRACE_FIELDS), keep_logits=True)
        close("logits", actual.logits, expected.logits)
        close(
            "logits from the final hidden state",
            logits_from_hidden(teacher, final_hidden(teacher, input_ids)),
            expected.logits,
        )
        for name in TRACE_FIELDS:
            for idx, tensor in getattr(expected, name).items():
                close(f"{name}[{idx}]", getattr(actual, name)[idx], tensor)

        cache = DynamicCache(config=student.config)
        for t in range(length):
            logits = student(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            close(f"decoding logits at position {t}", logits[:, 0], expected.logits[:, t])

        prompt = input_ids[:, : length // 2]
        options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        generated = student.generate(prompt, **options)
        wanted = teacher.generate(prompt, **options)
    assert torch.equal(generated, wanted), f"{model_type} ({adapter.name}): greedy generate differs from the teacher's"
    return report
