"""Each MOHAWK stage lowers its loss on a tiny teacher; schedules have the right shape."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from mixerdistill.plugins import get_mixer, get_stage
from mixerdistill.stages import ScheduleConfig, StageContext
from mixerdistill.student import build_student, mixer_layers
from mixerdistill.teacher import trace_teacher
from mixerdistill.training import Placement, Reporting, train_stage
from mixerdistill_plugins.families import LlamaAdapter


def context_for(teacher):
    adapter = LlamaAdapter()
    mixer = get_mixer("discrete_mamba2")
    torch.manual_seed(0)
    student = build_student(teacher, adapter, mixer, mixer.Config(chunk_size=16), keep_attention=[])
    return StageContext(teacher=teacher, student=student, adapter=adapter, mixers=mixer_layers(student, adapter))


def batches(seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Text-like data: a repeated random "sentence" pattern so the teacher's attention is non-trivial.
    base = torch.randint(2, 256, (64,), generator=generator)
    while True:
        offsets = torch.randint(0, 64, (4,), generator=generator)
        yield torch.stack([base.roll(int(o))[:48] for o in offsets])


@pytest.mark.parametrize(
    "name, options",
    [
        ("matrix_orientation", {"optimizer": {"lr": 3e-3}}),
        ("hidden_state_alignment", {"optimizer": {"lr": 3e-3}}),
        ("hidden_state_alignment", {"optimizer": {"lr": 3e-3}, "target": "mixer"}),
        ("hidden_state_alignment", {"optimizer": {"lr": 3e-3}, "trainable": ["mixer", "mlp", "norms"]}),
        ("knowledge_distillation", {"optimizer": {"lr": 3e-3}, "ce_weight": 0.5}),
        ("knowledge_distillation", {"optimizer": {"lr": 3e-3}, "freeze": ["mlp", "norms", "embeddings"]}),
        ("hidden_state_alignment", {"optimizer": {"lr": 3e-3}, "distance": "relative"}),
    ],
)
def test_stage_loss_falls(tmp_path, name, options):
    teacher = tiny_llama()
    context = context_for(teacher)
    stage_cls = get_stage(name)
    config = stage_cls.Config.model_validate(
        {
            "tokens": 30 * 4 * 48,
            "batch_size": 4,
            "seq_len": 48,
            "schedule": {"name": "constant", "warmup": 0},
            **options,
        }
    )
    stage = stage_cls(config, context)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = train_stage(
        stage,
        name,
        context.student,
        batches(),
        Placement(torch.device("cpu")),
        Reporting(tmp_path / "metrics.jsonl", show_progress=False),
    )
    assert result.steps == 30
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    losses = [__import__("json").loads(line)["loss"] for line in lines]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    # The teacher never changes; what did not learn still lies on its storage, what learned has its own.
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    learned = {id(p) for p in stage.trainable_parameters()} | {
        id(p) for mixer in context.mixers.values() for p in mixer.parameters()
    }
    for parameter in context.student.parameters():
        assert (parameter.untyped_storage().data_ptr() in teacher_storage) == (id(parameter) not in learned)


def test_stage_trainable_groups():
    teacher = tiny_llama()
    context = context_for(teacher)
    adapter = context.adapter
    layer = adapter.layers(context.student)[0]
    mlp = {id(p) for p in adapter.mlp(layer).parameters()}

    def trainable(name, **options):
        stage_cls = get_stage(name)
        return {id(p) for p in stage_cls(stage_cls.Config(tokens=1, **options), context).trainable_parameters()}

    stage2 = trainable("hidden_state_alignment")
    assert stage2 == {id(p) for m in context.mixers.values() for p in m.parameters()}
    assert mlp <= trainable("hidden_state_alignment", trainable=["mixer", "mlp"])
    assert not mlp & trainable("knowledge_distillation", freeze=["mlp"])
    assert mlp <= trainable("knowledge_distillation")
    embedding = context.student.get_input_embeddings().weight
    assert id(embedding) not in trainable("matrix_orientation")
    only_mixers = trainable("knowledge_distillation", freeze=["mlp", "norms", "embeddings", "attention"])
    assert only_mixers == {id(p) for m in context.mixers.values() for p in m.parameters()}


def test_warmup_stable_decay_schedule():
    schedule = ScheduleConfig(name="wsd", warmup=0.1, decay=0.2)
    factors = [schedule.factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(f == 1.0 for f in factors[10:80])
    assert factors[-1] == pytest.approx(0.0) and factors[90] < factors[80]
    cosine = ScheduleConfig(name="cosine", warmup=0.0, min_lr_ratio=0.1)
    assert cosine.factor(0, 10) == pytest.approx(1.0) and cosine.factor(10, 10) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        ScheduleConfig(name="wsd", warmup=0.6, decay=0.5)


def test_sink_tokens_drop_sink_columns_from_the_stage1_target():
    teacher = tiny_llama()
    context = context_for(teacher)
    stage_cls = get_stage("matrix_orientation")
    ids = next(batches())
    everything_sink = stage_cls(stage_cls.Config(tokens=1, sink_tokens=ids.shape[1]), context)
    loss, _ = everything_sink.loss(ids)  # the target is all zeros: the loss is the student's own norm
    trace = trace_teacher(teacher, context.adapter, ids, record={"mixer_inputs"})
    expected = sum(
        torch.linalg.matrix_norm(m.mixing_matrix(trace.mixer_inputs[i])).mean() for i, m in context.mixers.items()
    )
    assert torch.allclose(loss, expected, rtol=1e-5)
    plain, _ = stage_cls(stage_cls.Config(tokens=1), context).loss(ids)
    one_sink, _ = stage_cls(stage_cls.Config(tokens=1, sink_tokens=1), context).loss(ids)
    assert not torch.allclose(plain, one_sink)


@pytest.mark.parametrize(
    "mixer_name, options",
    [("discrete_mamba2", {"chunk_size": 16}), ("mamba2", {}), ("linear_attention", {"normalize": True})],
)
@pytest.mark.parametrize("sink_tokens", [0, 2])
def test_blockwise_matrix_loss_equals_materialised(mixer_name, options, sink_tokens):
    """Same stage-1 loss and gradients whether the matrices are compared whole or in checkpointed row blocks
    (block sizes that do and do not divide T)."""
    teacher = tiny_llama()
    adapter = LlamaAdapter()
    mixer_cls = get_mixer(mixer_name)
    torch.manual_seed(0)
    student = build_student(teacher, adapter, mixer_cls, mixer_cls.Config(**options), keep_attention=[])
    context = StageContext(teacher=teacher, student=student, adapter=adapter, mixers=mixer_layers(student, adapter))
    stage_cls = get_stage("matrix_orientation")
    ids = next(batches())  # (4, 48)
    results = []
    for matrix_loss, block_rows in (("materialised", 256), ("blockwise", 16), ("blockwise", 13)):
        stage = stage_cls(
            stage_cls.Config(tokens=1, matrix_loss=matrix_loss, block_rows=block_rows, sink_tokens=sink_tokens), context
        )
        parameters = stage.trainable_parameters()
        loss, metrics = stage.loss(ids)
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        results.append((loss.detach(), [g for g in gradients if g is not None]))
    (loss, gradients), *blockwise = results
    assert gradients and all(g.abs().sum() > 0 for g in gradients)
    for other_loss, other_gradients in blockwise:
        assert torch.allclose(other_loss, loss, rtol=1e-5)
        assert len(other_gradients) == len(gradients)
        for g, other in zip(gradients, other_gradients):
            assert (other - g).norm() <= 1e-5 * g.norm()


def test_auto_matrix_loss_is_decided_from_shapes_alone(monkeypatch):
    """``matrix_loss: auto`` depends on batch, length and heads only: the machine's free memory plays no
    part, so every rank and a resumed run take the same path."""
    import os

    from mixerdistill.matrix_loss import MATERIALISED_LIMIT

    stage_cls = get_stage("matrix_orientation")
    context = context_for(tiny_llama())
    heads = sum(mixer.geometry.num_heads for mixer in context.mixers.values())

    def resolved(length, batch=1, **options):
        config = stage_cls.Config(tokens=1, batch_size=batch, seq_len=length, **options)
        return stage_cls.resolve(config, context).matrix_loss

    assert resolved(256) == "materialised"
    assert resolved(1024) == "blockwise"
    assert resolved(64, matrix_loss="blockwise") == "blockwise"
    assert resolved(8192, matrix_loss="materialised") == "materialised"
    # just past the memory limit: 6 fp32 (B, H, T, T) buffers
    batch = MATERIALISED_LIMIT // (6 * heads * 512**2 * 4) + 1
    assert resolved(512, batch=batch) == "blockwise" and resolved(512, batch=batch - 1) == "materialised"
    monkeypatch.setattr(os, "sysconf", lambda name: 1)  # a machine with no free memory changes nothing
    assert resolved(256) == "materialised"
    stage = stage_cls(stage_cls.Config(tokens=1, seq_len=2048, block_rows=64), context)
    assert stage.block_rows() == 64
