"""Chunked vocabulary losses (mixerdistill.logits) equal the whole-logits formulas, value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixerdistill.logits import chunked_distillation_loss, next_token_nll
from mixerdistill.testing import tiny_model


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_distillation_equals_whole_logits(temperature):
    teacher, student = tiny_model("gemma2", seed=0), tiny_model("gemma2", seed=1).requires_grad_(True)
    input_ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    loss = chunked_distillation_loss(student, teacher, input_ids, temperature, ce_weight=0.5, chunk_tokens=5)
    loss.loss.backward()
    kl, ce = loss.kl, loss.ce
    chunked = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()

    logits, target_logits = student(input_ids).logits, teacher(input_ids).logits  # soft-capped by the model
    log_probs = F.log_softmax(logits.flatten(0, 1) / temperature, -1)
    whole_kl = (
        F.kl_div(
            log_probs,
            F.log_softmax(target_logits.flatten(0, 1) / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    whole_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    (whole_kl + 0.5 * whole_ce).backward()
    assert torch.allclose(kl, whole_kl, rtol=1e-5) and torch.allclose(ce, whole_ce, rtol=1e-5)
    for name, p in student.named_parameters():
        assert torch.allclose(chunked[name], p.grad, rtol=1e-4, atol=1e-7), name


def test_next_token_nll_equals_whole_logits():
    model = tiny_model("granite")  # logits divided by logits_scaling
    input_ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids).logits[:, :-1]
    expected = F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="sum").item()
    assert next_token_nll(model, input_ids, chunk_tokens=4) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("stage_name", "settings"),
    [
        ("matrix_orientation", {"sink_tokens": 1}),
        ("hidden_state_alignment", {"target": "block"}),
        ("hidden_state_alignment", {"target": "mixer"}),
    ],
)
def test_layer_local_recompute_gives_the_same_loss_and_gradients(stage_name, settings):
    from mixerdistill.plugins import get_mixer, get_stage
    from mixerdistill.stages import StageContext
    from mixerdistill.student import build_student, mixer_layers
    from mixerdistill_plugins.families import LlamaAdapter

    teacher, adapter, mixer = tiny_model("llama"), LlamaAdapter(), get_mixer("discrete_mamba2")
    student = build_student(teacher, adapter, mixer, mixer.Config(chunk_size=4), keep_attention=[1])
    context = StageContext(teacher=teacher, student=student, adapter=adapter, mixers=mixer_layers(student, adapter))
    stage_cls = get_stage(stage_name)
    input_ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (True, False):
        stage = stage_cls(stage_cls.Config(tokens=20, recompute=recompute, **settings), context)
        parameters = stage.trainable_parameters()
        for parameter in parameters:
            parameter.requires_grad_(True).grad = None
        loss, _ = stage.loss(input_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in parameters]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stage3_recompute_gives_the_same_loss_and_gradients(family):
    """Stage 3's block recompute saves only the blocks' inputs, and the backward recomputes them: the loss
    and every gradient are the full-activation ones, and the model is left as it was."""
    from mixerdistill.plugins import get_mixer, get_stage
    from mixerdistill.stages import StageContext
    from mixerdistill.student import build_student, mixer_layers
    from mixerdistill.teacher import find_adapter

    teacher, mixer = tiny_model(family), get_mixer("discrete_mamba2")
    adapter = find_adapter(teacher.config)
    student = build_student(teacher, adapter, mixer, mixer.Config(chunk_size=4), keep_attention=[1]).train()
    context = StageContext(teacher=teacher, student=student, adapter=adapter, mixers=mixer_layers(student, adapter))
    stage_cls = get_stage("knowledge_distillation")
    input_ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (True, False):
        stage = stage_cls(stage_cls.Config(tokens=20, recompute=recompute), context)
        parameters = stage.trainable_parameters()
        for parameter in parameters:
            parameter.requires_grad_(True).grad = None
        saved = []

        def count(tensor, saved=saved):
            saved.append(tensor.numel())
            return tensor

        torch.manual_seed(0)  # GPT-2 has dropout: the same masks in both runs (the recompute replays them)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            loss, _ = stage.loss(input_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in parameters], sum(saved)))
        assert not student.is_gradient_checkpointing
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = results
    assert saved_a < saved_b / 2, (saved_a, saved_b)  # the blocks' activations were not kept
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads_a, grads_b))


def test_compacted_tokenizer_encodes_and_saves_as_before(tmp_path):
    from transformers import AutoTokenizer
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    from mixerdistill.teacher_sources import compact_tokenizer

    def gemma_like():
        pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", "t", "h", "e", "▁t", "he", "▁the", "a"]
        merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
        return GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges)

    plain, compact = gemma_like(), compact_tokenizer(gemma_like())
    assert "_merges" in vars(plain) and "_merges" not in vars(compact) and "_vocab" not in vars(compact)
    text = "the hat, the tea"
    assert compact(text)["input_ids"] == plain(text)["input_ids"]
    compact.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == plain(text)["input_ids"]
