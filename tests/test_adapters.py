"""Teacher adapters: every supported family reproduces its teacher exactly through the all-attention student
(``check_adapter`` on tiny random models), and a wrong adapter ends in the transfer check's error."""

from __future__ import annotations

import pytest
import torch

from mixerdistill.mixer import fold_qk_norm
from mixerdistill.plugins import get_mixer, registry
from mixerdistill.student import build_student
from mixerdistill.testing import TINY_CONFIGS, check_adapter, tiny_model
from mixerdistill.transfer_check import TransferMismatch, check_transfer

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_family_reproduces_its_teacher(model_type):
    report = check_adapter(model_type)
    assert report.adapter and max(report.differences.values()) <= 1e-5


@pytest.mark.slow
def test_no_wrong_adapter_is_silent():
    """Every (family, adapter) pair either stops at the transfer check or reproduces the teacher's logits."""
    teachers = registry("teachers")
    attention = get_mixer("attention")
    input_ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    outcomes = {}
    for model_type in sorted(TINY_CONFIGS):
        model = tiny_model(model_type)
        expected = model(input_ids).logits
        for name in teachers.names():
            try:
                check_transfer(model, teachers.get(name), range(model.config.num_hidden_layers))
            except TransferMismatch:
                outcomes[model_type, name] = "stopped"
                continue
            student = build_student(model, teachers.get(name), attention, attention.Config(), [])
            difference = (student(input_ids).logits - expected).abs().max().item()
            assert difference <= 1e-5, f"adapter '{name}' on {model_type}: silently wrong by {difference:.3g}"
            outcomes[model_type, name] = "exact"
    assert outcomes["qwen3", "llama"] == outcomes["gpt2", "llama"] == "stopped"
    assert outcomes["gemma", "llama"] == "exact"  # Gemma's attention is Llama's


@pytest.mark.parametrize(
    "model_type, adapter, piece",
    [
        ("qwen3", "llama", "first differing piece: projections and norms: .* q_norm.weight, k_norm.weight"),
        ("granite", "llama", "first differing piece: attention probabilities .* scale=0.25"),
        ("gemma2", "gemma", "first differing piece: attention probabilities"),
        ("phi", "llama", "first differing piece: reading the projections: .*'o_proj'"),
        ("gpt_neox", "llama", "first differing piece: the decoder layers"),
    ],
)
def test_transfer_mismatch_names_layer_family_and_piece(model_type, adapter, piece):
    with pytest.raises(TransferMismatch, match=f"adapter '{adapter}' does not reproduce") as caught:
        check_adapter(model_type, registry("teachers").get(adapter))
    message = str(caught.value)
    assert f"this {model_type} teacher" in message
    assert "layer 0" in message or "the layers" in message
    assert pytest.importorskip("re").search(piece, message), message


def test_fold_qk_norm_leaves_only_the_per_token_rms():
    """Qwen3 (per head) and OLMo2 (over the projection): the folded q equals the teacher's normed q up to one
    positive factor per token and head (or per token), so C·B starts as the teacher's scores up to scale."""
    for model_type in ("qwen3", "olmo2"):
        model = tiny_model(model_type)
        adapter = registry("teachers").get({"qwen3": "qwen3", "olmo2": "olmo2"}[model_type])
        attention = adapter.attention(adapter.layers(model)[0])
        geometry = adapter.geometry(model.config, 0)
        folded = fold_qk_norm(adapter.attention_weights(attention), geometry)
        x = torch.randn(5, geometry.hidden_size)
        q = attention.q_proj(x)
        normed = attention.q_norm(q if model_type == "olmo2" else q.view(5, -1, geometry.head_dim)).reshape(5, -1)
        ratio = (x @ folded.q.T) / normed  # (5, H·d)
        ratio = ratio.view(5, -1, geometry.head_dim) if model_type == "qwen3" else ratio
        assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4), model_type
        assert (ratio > 0).all()
