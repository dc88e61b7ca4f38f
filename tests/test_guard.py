"""The numerical guard: a NaN injected into an activation or a gradient stops the stage with a message
naming the stage, the step and the module; the last checkpoint stays good; skip_nonfinite skips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_stages import batches, context_for

from conftest import tiny_llama
from mixerdistill.checkpoint import MODEL_FILE, StageProgress
from mixerdistill.plugins import get_stage
from mixerdistill.training import Checkpointing, NonFiniteLoss, Placement, Reporting, train_stage

STEPS = 8


def make_stage(**options):
    context = context_for(tiny_llama())
    stage_cls = get_stage("knowledge_distillation")
    config = stage_cls.Config.model_validate(
        {"tokens": STEPS * 4 * 48, "batch_size": 4, "seq_len": 48, "optimizer": {"lr": 1e-3}, **options}
    )
    return stage_cls(config, context), context.student


def poisoned_batches(bad_steps: set[int], flag: dict):
    """Batches that switch ``flag['on']`` on while a step in ``bad_steps`` (1-based) runs."""
    for step, batch in enumerate(batches(), start=1):
        flag["on"] = step in bad_steps
        yield batch


def nan_output_hook(flag: dict):
    def hook(module, inputs, output):
        return output * float("nan") if flag["on"] else output

    return hook


def test_nonfinite_activation_names_stage_step_and_module(tmp_path):
    stage, student = make_stage()
    flag = {"on": False}
    student.get_submodule("model.layers.1.self_attn.mixer.in_proj").register_forward_hook(nan_output_hook(flag))
    progress = StageProgress(tmp_path / "progress", every_steps=1)
    with pytest.raises(NonFiniteLoss) as caught:
        train_stage(
            stage,
            "knowledge_distillation",
            student,
            poisoned_batches({4, 5, 6}, flag),
            Placement(torch.device("cpu")),
            Reporting(tmp_path / "metrics.jsonl", show_progress=False),
            Checkpointing(progress),
        )
    message = str(caught.value)
    assert "stage 'knowledge_distillation', step 4 of 8" in message
    assert "loss is nan" in message
    assert "module 'model.layers.1.self_attn.mixer.in_proj'" in message
    # The last good checkpoint (after step 3) is intact and holds the weights the stage stopped with.
    point = progress.latest()
    assert point.step == 3
    saved = load_file(point.directory / MODEL_FILE)
    assert all(torch.isfinite(t).all() for t in saved.values())
    state = student.state_dict()
    assert all(torch.equal(saved[name], state[name]) for name in saved)


def test_nonfinite_gradient_names_the_module(tmp_path):
    stage, student = make_stage()
    flag = {"on": False}
    weight = student.get_submodule("model.layers.0.self_attn.mixer.in_proj").weight
    weight.register_hook(lambda grad: grad * float("nan") if flag["on"] else grad)
    with pytest.raises(NonFiniteLoss) as caught:
        train_stage(
            stage,
            "knowledge_distillation",
            student,
            poisoned_batches({2}, flag),
            Placement(torch.device("cpu")),
            Reporting(tmp_path / "metrics.jsonl", show_progress=False),
        )
    message = str(caught.value)
    assert "step 2 of 8" in message and "gradient norm is nan" in message
    assert "module 'model.layers.0.self_attn.mixer.in_proj'" in message
    assert all(torch.isfinite(p).all() for p in student.parameters())  # no update from the bad step


def test_skip_nonfinite_skips_up_to_n_steps(tmp_path):
    stage, student = make_stage(skip_nonfinite=2)
    flag = {"on": False}
    student.get_submodule("model.layers.1.self_attn.mixer.out_proj").register_forward_hook(nan_output_hook(flag))
    result = train_stage(
        stage,
        "knowledge_distillation",
        student,
        poisoned_batches({3, 6}, flag),
        Placement(torch.device("cpu")),
        Reporting(tmp_path / "metrics.jsonl", show_progress=False),
    )
    assert result.steps == STEPS
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == [3, 6]
    assert "model.layers.1.self_attn.mixer.out_proj" in records[2]["skipped"]
    assert all(torch.isfinite(p).all() for p in student.parameters())

    stage, student = make_stage(skip_nonfinite=2)
    student.get_submodule("model.layers.1.self_attn.mixer.out_proj").register_forward_hook(nan_output_hook(flag))
    with pytest.raises(NonFiniteLoss, match=r"step 7 of 8: .*Stopped after 3 non-finite step\(s\)"):
        train_stage(
            stage,
            "knowledge_distillation",
            student,
            poisoned_batches({2, 5, 7}, flag),
            Placement(torch.device("cpu")),
            Reporting(tmp_path / "metrics2.jsonl", show_progress=False),
        )
