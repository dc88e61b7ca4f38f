"""AttentionMixer against real transformers attention (tiny random Llama with GQA, Phi with partial RoPE),
and the teacher trace / run_block of the Llama and Phi adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from mixerdistill.errors import UserError
from mixerdistill.teacher import trace_teacher
from mixerdistill_plugins.attention import AttentionMixer
from mixerdistill_plugins.families import LlamaAdapter, PhiAdapter

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    attn_implementation="eager",
)


def tiny_llama():
    """GQA: 4 query heads share 2 kv heads; full RoPE over head_dim 16."""
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **SMALL)).eval(), LlamaAdapter()


def tiny_phi():
    """Partial RoPE (factor 0.5: 8 of 16 dims per head), biases on every projection."""
    config = PhiConfig(partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2, **SMALL)
    return PhiForCausalLM(config).eval(), PhiAdapter()


FAMILIES = {"llama": tiny_llama, "phi": tiny_phi}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, adapter = FAMILIES[request.param]()
    input_ids = torch.randint(0, 256, (2, 12))
    return model, adapter, input_ids


def mixers(model, adapter):
    return [
        AttentionMixer.from_attention(
            adapter.attention_weights(adapter.attention(layer)),
            adapter.geometry(model.config, idx),
            AttentionMixer.Config(),
        )
        for idx, layer in enumerate(adapter.layers(model))
    ]


def test_geometry():
    llama, phi = tiny_llama()[0], tiny_phi()[0]
    g = LlamaAdapter().geometry(llama.config, 1)
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.rotary_dim, g.layer_idx) == (4, 2, 16, 16, 1)
    assert not g.attention_bias and not g.output_bias
    g = PhiAdapter().geometry(phi.config, 0)
    assert (g.num_heads, g.num_kv_heads, g.head_dim, g.rotary_dim) == (4, 4, 16, 8)
    assert g.attention_bias and g.output_bias


def test_phi_qk_layernorm_is_refused():
    config = PhiConfig(qk_layernorm=True, **SMALL)
    with pytest.raises(UserError, match="qk_layernorm"):
        PhiAdapter().geometry(config, 0)


def test_matches_teacher_attention(family):
    model, adapter, input_ids = family
    trace = trace_teacher(model, adapter, input_ids, record={"mixer_inputs", "mixer_outputs"})
    probabilities = model(input_ids, output_attentions=True).attentions
    for idx, mixer in enumerate(mixers(model, adapter)):
        u = trace.mixer_inputs[idx]
        rotary = trace.rotary(idx)
        matrix = mixer.mixing_matrix(u, rotary)
        assert matrix.shape == (2, 4, 12, 12)
        assert rel_err(matrix, probabilities[idx]) <= 1e-5
        assert torch.equal(matrix, matrix.tril())
        output, state = mixer(u, rotary=rotary)
        assert rel_err(output, trace.mixer_outputs[idx]) <= 1e-5
        assert rel_err(mixer.materialised_forward(u, rotary), output) <= 1e-5
        assert state["k"].shape == state["v"].shape == (2, 12, mixer.geometry.num_kv_heads, 16)


def test_decoding_matches_full_forward(family):
    model, adapter, _ = family
    mixer = mixers(model, adapter)[0]
    u = torch.randn(2, 9, 64)
    positions = torch.arange(9).expand(2, 9)
    cos, sin = adapter.rotary(model, u, positions)  # (B, T, rotary_dim) each
    full, full_state = mixer(u, rotary=(cos, sin))

    state = mixer.init_state(2)
    assert state["k"].shape == (2, 0, mixer.geometry.num_kv_heads, 16)
    steps = []
    for t in range(9):
        y, state = mixer.step(u[:, t], state, rotary=(cos[:, t], sin[:, t]))
        steps.append(y)
    assert rel_err(torch.stack(steps, dim=1), full) <= 1e-5
    assert rel_err(state["k"], full_state["k"]) <= 1e-6

    split = 4
    head, state = mixer(u[:, :split], rotary=(cos[:, :split], sin[:, :split]))
    tail, state = mixer(u[:, split:], state=state, rotary=(cos[:, split:], sin[:, split:]))
    assert rel_err(torch.cat((head, tail), dim=1), full) <= 1e-5
    from_empty, _ = mixer(u, state=mixer.init_state(2), rotary=(cos, sin))
    assert rel_err(from_empty, full) <= 1e-6


def test_trace_blocks_chain_and_run_block(family):
    model, adapter, input_ids = family
    trace = trace_teacher(model, adapter, input_ids, record={"block_inputs", "block_outputs"}, keep_logits=True)
    layers = adapter.layers(model)
    assert sorted(trace.block_inputs) == sorted(trace.block_outputs) == list(range(len(layers)))
    assert not trace.mixer_inputs and trace.logits.shape == (2, 12, 256)
    for idx in range(len(layers) - 1):
        assert torch.equal(trace.block_outputs[idx], trace.block_inputs[idx + 1])
    positions = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        for idx, layer in enumerate(layers):
            output = adapter.run_block(layer, trace.block_inputs[idx], trace.rotary(idx), positions)
            assert rel_err(output, trace.block_outputs[idx]) <= 1e-6


def test_trace_stops_after_last_wanted_layer(family):
    model, adapter, input_ids = family
    trace = trace_teacher(model, adapter, input_ids, record={"mixer_inputs", "block_outputs"}, layers={0, 1})
    assert sorted(trace.mixer_inputs) == sorted(trace.block_outputs) == [0, 1]
    assert sorted(trace.rotaries) == [0, 1] and trace.logits is None
    assert trace.rotary(0)[0].shape[-1] == adapter.geometry(model.config, 0).rotary_dim
