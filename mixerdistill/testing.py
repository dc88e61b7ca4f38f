"""Test helpers for mixers, as a pytest plugin (loaded automatically once mixerdistill is installed).

``check_mixer(MixerClass)`` is the conformance check every mixer must pass; a plugin author calls it from
their own tests. It builds the mixer on a tiny attention geometry in float64, perturbs its parameters
away from any special initialisation, and asserts that

  * ``mixing_matrix`` is (B, H, T, T), finite and zero above the diagonal, and ``matrix_rows`` blocks
    (stage 1's blockwise loss) are its slices;
  * ``forward``, ``materialised_forward`` and a loop of ``step`` give the same outputs;
  * the state after ``forward`` equals the state after the ``step`` loop, key by key and shape by shape,
    and (unless ``state_grows``) has the shapes of ``init_state``: constant memory;
  * ``forward`` continues from a state: two calls on a split sequence equal one call on all of it;
  * gradients flow: every parameter gets a finite gradient from ``forward``, the same one as through
    ``materialised_forward``; a loss on ``mixing_matrix`` reaches some of ``matrix_parameters`` and no
    parameter outside them.

Fixtures: ``tiny_geometry`` (the geometry the check uses), ``tiny_teacher`` (a random 2-layer Llama,
grouped-query attention, byte-sized vocabulary) and ``register_plugin`` (registers a plugin object or
module in the process-wide plugin manager for one test, so recipes run in-process can name its mixers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

GEOMETRY = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=8, layer_idx=0,
                attention_bias=False, output_bias=True)


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
    """What ``check_mixer`` measured; every error is relative to the reference's scale."""

    mixer: str
    errors: dict[str, float] = field(default_factory=dict)
    state_shapes: dict[str, tuple] = field(default_factory=dict)


def check_mixer(mixer_cls, config=None, geometry=None, *, batch: int = 2, length: int = 19, cut: int = 7,
                seed: int = 0, perturbation: float = 0.1, tolerance: float = 1e-6) -> ConformanceReport:
    """Run the conformance check on ``mixer_cls`` (see the module docstring); raises AssertionError on failure.

    ``config`` defaults to ``mixer_cls.Config()``; ``geometry`` to ``tiny_geometry``. Pick a ``length``
    longer than the mixer's chunk size, or set a small chunk size in ``config``, so chunk boundaries are
    crossed. Runs in float64, where all three paths agree to ~1e-12, so ``tolerance`` can be tight.
    """
    import torch

    geometry = geometry if geometry is not None else tiny_geometry_value()
    config = config if config is not None else mixer_cls.Config()
    name = mixer_cls.__name__
    report = ConformanceReport(name)

    def close(label: str, actual, expected) -> None:
        assert actual.shape == expected.shape, f"{name}: {label}: shape {tuple(actual.shape)} ≠ {tuple(expected.shape)}"
        error = relative_error(actual, expected)
        report.errors[label] = error
        assert error <= tolerance, f"{name}: {label} differ by {error:.3g} (relative), tolerance {tolerance:g}"

    torch.manual_seed(seed)
    mixer = mixer_cls(geometry, config).to(torch.float64)
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.add_(perturbation * torch.randn_like(parameter))
    u = torch.randn(batch, length, geometry.hidden_size, dtype=torch.float64)
    rotary = rotary_for(length, geometry.rotary_dim, batch, torch.float64)

    # The matrix view.
    with torch.no_grad():
        M = mixer.mixing_matrix(u, rotary)
    assert M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (length, length), \
        f"{name}: mixing_matrix must be (B, H, T, T) = ({batch}, H, {length}, {length}), got {tuple(M.shape)}"
    assert torch.isfinite(M).all(), f"{name}: mixing_matrix has non-finite entries"
    assert torch.equal(M.triu(1), torch.zeros_like(M)), f"{name}: mixing_matrix is not causal (entries above the diagonal)"
    with torch.no_grad():
        rows = mixer.matrix_rows(u, rotary)
        for start, stop in ((0, 3), (3, length), (length - 1, length)):
            close(f"matrix_rows({start}, {stop}) vs mixing_matrix", rows(start, stop), M[:, :, start:stop, :stop])

    # Three paths, one output.
    with torch.no_grad():
        out, state = mixer(u, rotary=rotary)
        assert out.shape == u.shape, f"{name}: forward must return (B, T, D), got {tuple(out.shape)}"
        close("forward vs materialised_forward", out, mixer.materialised_forward(u, rotary))
        stepped = mixer.init_state(batch, device=u.device, dtype=u.dtype)
        initial_shapes = {key: tuple(value.shape) for key, value in stepped.items()}
        outputs = []
        for t in range(length):
            token_rotary = None if rotary is None else tuple(r[:, t] for r in rotary)
            o_t, stepped = mixer.step(u[:, t], stepped, rotary=token_rotary)
            outputs.append(o_t)
        close("forward vs step", torch.stack(outputs, dim=1), out)

        # States: the same keys, shapes and values by both routes; constant size unless the mixer says not.
        assert set(state) == set(stepped) == set(initial_shapes), \
            f"{name}: state keys differ: forward {sorted(state)}, step {sorted(stepped)}, init_state {sorted(initial_shapes)}"
        for key in state:
            close(f"state '{key}' forward vs step", state[key], stepped[key])
            report.state_shapes[key] = tuple(state[key].shape)
            if not mixer_cls.state_grows:
                assert tuple(state[key].shape) == initial_shapes[key], \
                    f"{name}: state '{key}' is {tuple(state[key].shape)} after {length} tokens but " \
                    f"{initial_shapes[key]} from init_state (set state_grows = True if that is intended)"

        # Chunked prefill: continue from a state.
        first_rotary = None if rotary is None else tuple(r[:, :cut] for r in rotary)
        rest_rotary = None if rotary is None else tuple(r[:, cut:] for r in rotary)
        head, middle = mixer(u[:, :cut], rotary=first_rotary)
        tail, last = mixer(u[:, cut:], state=middle, rotary=rest_rotary)
        close("forward continued from a state", torch.cat([head, tail], dim=1), out)
        for key in state:
            close(f"state '{key}' after continuing", last[key], state[key])

    # Gradients: through forward and through the matrix, the same, finite and reaching every parameter.
    weight = torch.randn_like(u)
    gradients = []
    for path in (lambda: mixer(u, rotary=rotary)[0], lambda: mixer.materialised_forward(u, rotary)):
        mixer.zero_grad(set_to_none=True)
        (path() * weight).sum().backward()
        gradients.append({n: p.grad for n, p in mixer.named_parameters()})
    for parameter_name, gradient in gradients[0].items():
        assert gradient is not None, f"{name}: parameter '{parameter_name}' gets no gradient from forward"
        assert torch.isfinite(gradient).all(), f"{name}: parameter '{parameter_name}' has a non-finite gradient"
        close(f"gradient of '{parameter_name}' forward vs materialised", gradient, gradients[1][parameter_name])
    assert any(g.abs().sum() > 0 for g in gradients[0].values()), f"{name}: every gradient is zero"

    mixer.zero_grad(set_to_none=True)
    mixer.mixing_matrix(u, rotary).square().sum().backward()
    matrix_ids = {id(p) for p in mixer.matrix_parameters()}
    reached = {n for n, p in mixer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    outside = sorted(n for n, p in mixer.named_parameters() if n in reached and id(p) not in matrix_ids)
    assert not outside, f"{name}: {outside} shape the mixing matrix but are not in matrix_parameters()"
    assert reached, f"{name}: no parameter shapes the mixing matrix"
    mixer.zero_grad(set_to_none=True)
    return report


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
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
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

TINY_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 attn_implementation="eager")
GQA = dict(num_key_value_heads=2)
WINDOW = 6  # shorter than check_adapter's sequence, so sliding windows matter
TINY_CONFIGS: dict[str, dict] = {
    "llama": GQA,
    "mistral": {**GQA, "sliding_window": WINDOW},
    "qwen2": GQA,
    "qwen3": {**GQA, "head_dim": 16},
    "olmo2": GQA,
    "gemma": {**GQA, "head_dim": 16},
    "gemma2": {**GQA, "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 30.0, "sliding_window": WINDOW},
    "gemma3_text": {**GQA, "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
    "granite": {**GQA, "attention_multiplier": 0.5, "residual_multiplier": 0.7, "embedding_multiplier": 2.0,
                "logits_scaling": 3.0},
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


def check_adapter(model_type: str, adapter=None, *, model=None, batch: int = 2, length: int = 12,
                  new_tokens: int = 5, seed: int = 0, tolerance: float = 1e-5) -> AdapterReport:
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
        close("logits from the final hidden state", logits_from_hidden(teacher, final_hidden(teacher, input_ids)),
              expected.logits)
        for name in TRACE_FIELDS:
            for idx, tensor in getattr(expected, name).items():
                close(f"{name}[{idx}]", getattr(actual, name)[idx], tensor)

        cache = DynamicCache(config=student.config)
        for t in range(length):
            logits = student(input_ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            close(f"decoding logits at position {t}", logits[:, 0], expected.logits[:, t])

        prompt = input_ids[:, : length // 2]
        options = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        generated = student.generate(prompt, **options)
        wanted = teacher.generate(prompt, **options)
    assert torch.equal(generated, wanted), f"{model_type} ({adapter.name}): greedy generate differs from the teacher's"
    return report
