"""Student surgery: attention swapped for AttentionMixer with weight transfer must reproduce the teacher."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.phi.modeling_phi import PhiAttention

from mixerdistill.student import MixerLayer, build_student, mixer_counts, mixer_layers
from mixerdistill_plugins.attention import AttentionMixer
from mixerdistill_plugins.families import LlamaAdapter, PhiAdapter

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    attn_implementation="eager",
    bos_token_id=1,
    eos_token_id=2,
)

# family → (teacher builder, adapter, attention class, teacher name of the output projection)
FAMILIES = {
    "llama": (
        lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **SMALL)),
        LlamaAdapter(),
        LlamaAttention,
        "o_proj",
    ),
    "phi": (lambda: PhiForCausalLM(PhiConfig(partial_rotary_factor=0.5, **SMALL)), PhiAdapter(), PhiAttention, "dense"),
}
KEEP = [1]
REPLACED = [0, 2]


@pytest.fixture(params=sorted(FAMILIES))
def setup(request):
    torch.manual_seed(0)
    build, adapter, attention_cls, output_name = FAMILIES[request.param]
    teacher = build().eval()
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    student = build_student(teacher, adapter, AttentionMixer, AttentionMixer.Config(), keep_attention=KEEP).eval()
    return teacher, student, adapter, attention_cls, output_name, before


def test_surgery(setup):
    teacher, student, adapter, attention_cls, output_name, before = setup
    assert sorted(mixer_layers(student, adapter)) == REPLACED
    assert mixer_counts(student, adapter, "attention_mixer") == {"attention_mixer": 2, "attention": 1}
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    for idx in REPLACED:
        module = adapter.attention(adapter.layers(student)[idx])
        assert isinstance(module, MixerLayer) and isinstance(module.mixer, AttentionMixer)
        for mine, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", output_name)):
            for kind in ("weight", "bias"):
                name = f"model.layers.{idx}.self_attn.mixer.{mine}.{kind}"
                source = f"model.layers.{idx}.self_attn.{theirs}.{kind}"
                assert (name in student_params) == (source in teacher_params)
                if name in student_params:
                    assert torch.equal(student_params[name], teacher_params[source])
        assert not any(name.startswith(f"model.layers.{idx}.self_attn.{output_name}") for name in student_params)
    for idx in KEEP:
        kept = adapter.attention(adapter.layers(student)[idx])
        assert type(kept) is attention_cls
        prefix = f"model.layers.{idx}."
        for name, param in student_params.items():
            if name.startswith(prefix):
                assert param is not teacher_params[name]
                assert param.data_ptr() == teacher_params[name].data_ptr()  # on the teacher's storage
    # the mixers own their weights, whatever views of the teacher's q/k/v/o their transfer took
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    for mixer in mixer_layers(student, adapter).values():
        assert not any(p.untyped_storage().data_ptr() in teacher_storage for p in mixer.parameters())
    # everything that is not a replaced attention layer is copied unchanged
    replaced = tuple(f"model.layers.{idx}.self_attn." for idx in REPLACED)
    assert {n for n in student_params if not n.startswith(replaced)} == {
        n for n in teacher_params if not n.startswith(replaced)
    }
    # the teacher is untouched
    assert all(type(adapter.attention(layer)) is attention_cls for layer in adapter.layers(teacher))
    after = teacher.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_student_reproduces_teacher(setup):
    teacher, student, *_ = setup
    input_ids = torch.randint(3, 256, (2, 10))
    with torch.no_grad():
        expected, actual = teacher(input_ids).logits, student(input_ids).logits
    assert ((actual - expected).norm() / expected.norm()).item() <= 1e-5


def test_generate_with_and_without_cache(setup):
    teacher, student, *_ = setup
    input_ids = torch.randint(3, 256, (2, 6))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = teacher.generate(input_ids, **settings)
    cached = student.generate(input_ids, use_cache=True, **settings)
    uncached = student.generate(input_ids, use_cache=False, **settings)
    assert expected.shape == (2, 14)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, expected)


def test_loading_weights_leaves_the_teacher_and_shares_what_is_unchanged(tmp_path):
    """A checkpoint is loaded by rebinding tensors: the teacher, whose storage the student's untrained parts
    share, stays as it was; a part the checkpoint changed gets its own tensor, an unchanged one stays shared."""
    from mixerdistill.checkpoint import load_weights, save_checkpoint
    from mixerdistill.student import StudentSpec

    torch.manual_seed(0)
    build, adapter, *_ = FAMILIES["llama"]
    teacher = build().eval()
    before = {name: p.clone() for name, p in teacher.state_dict().items()}
    trained = build_student(teacher, adapter, AttentionMixer, AttentionMixer.Config(), keep_attention=KEEP)
    mlp = adapter.mlp(adapter.layers(trained)[0]).down_proj.weight
    mlp.data = mlp.data + 1.0
    save_checkpoint(trained, StudentSpec(mixer="attention", mixer_config={}), tmp_path / "checkpoint")

    student = build_student(teacher, adapter, AttentionMixer, AttentionMixer.Config(), keep_attention=KEEP)
    load_weights(student, tmp_path / "checkpoint")
    assert all(torch.equal(teacher.state_dict()[name], value) for name, value in before.items())
    loaded = adapter.mlp(adapter.layers(student)[0]).down_proj.weight
    assert torch.equal(loaded, mlp) and loaded.data_ptr() != teacher.model.layers[0].mlp.down_proj.weight.data_ptr()
    up = adapter.mlp(adapter.layers(student)[0]).up_proj.weight
    assert up.data_ptr() == teacher.model.layers[0].mlp.up_proj.weight.data_ptr()
    with torch.no_grad():
        input_ids = torch.randint(3, 256, (1, 8))
        assert torch.equal(student(input_ids).logits, trained(input_ids).logits)


def test_a_tied_students_checkpoint_loads_with_its_embedding(tmp_path):
    """safetensors writes a tied embedding once, as lm_head.weight: loading finds model.embed_tokens.weight there
    (and a checkpoint that lacks a tensor still fails)."""
    from safetensors.torch import load_file, save_file

    from mixerdistill.checkpoint import MODEL_FILE, assign_weights, load_weights, save_checkpoint
    from mixerdistill.student import StudentSpec
    from mixerdistill.testing import tiny_model

    teacher = tiny_model("llama", tie_word_embeddings=True)
    trained = build_student(teacher, LlamaAdapter(), AttentionMixer, AttentionMixer.Config(), keep_attention=[])
    trained.get_input_embeddings().weight.data = trained.get_input_embeddings().weight.data + 0.5
    save_checkpoint(trained, StudentSpec(mixer="attention", mixer_config={}), tmp_path / "checkpoint")
    assert "model.embed_tokens.weight" not in load_file(tmp_path / "checkpoint" / MODEL_FILE)
    student = build_student(teacher, LlamaAdapter(), AttentionMixer, AttentionMixer.Config(), keep_attention=[])
    load_weights(student, tmp_path / "checkpoint")
    assert torch.equal(student.get_input_embeddings().weight, trained.get_input_embeddings().weight)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    state = load_file(tmp_path / "checkpoint" / MODEL_FILE)
    del state["lm_head.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.embed_tokens.weight', 'lm_head.weight'\]"):
        assign_weights(student, load_file(tmp_path / "partial.safetensors"))
