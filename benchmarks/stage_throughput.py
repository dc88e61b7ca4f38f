"""Tokens/s of each stage of recipes/smollm2_mamba.yaml through mixerdistill against a bare PyTorch loop.

The bare loops do the same work with the plainest code: one teacher forward with forward hooks that
keep what the stage needs, the student modules called directly, AdamW on the same trainable
parameters; no progress bar, no metrics file, no per-layer logging. Prints both figures and their
ratio; asserts nothing.

    .venv/bin/python benchmarks/stage_throughput.py [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixerdistill.plugins import get_mixer, get_stage
from mixerdistill.recipe import load_recipe
from mixerdistill.stages import StageContext
from mixerdistill.student import build_student, mixer_layers
from mixerdistill.teacher import find_adapter
from mixerdistill.teacher_sources import load_teacher
from mixerdistill.training import build_optimizer, train_only, train_stage

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_mamba.yaml"


class AttentionTaps:
    """Forward hooks on the teacher's attention modules keeping their inputs, outputs and the rotary."""

    def __init__(self, context):
        self.inputs, self.outputs, self.rotary = {}, {}, None
        self.handles = [
            context.adapter.attention(context.adapter.layers(context.teacher)[idx]).register_forward_hook(
                self._keep(idx), with_kwargs=True)
            for idx in context.mixers]

    def _keep(self, idx):
        def hook(module, args, kwargs, output):
            self.inputs[idx], self.outputs[idx] = kwargs["hidden_states"], output[0]
            self.rotary = kwargs["position_embeddings"]
        return hook


def bare_matrix_orientation(context, taps, config, ids):
    with torch.no_grad():
        context.teacher(input_ids=ids, use_cache=False)
    total = 0.0
    for idx, mixer in context.mixers.items():
        with torch.no_grad():
            target = context.teacher_attention[idx].mixing_matrix(taps.inputs[idx], taps.rotary)
            target[..., :config.sink_tokens] = 0
        total = total + torch.linalg.matrix_norm(mixer.mixing_matrix(taps.inputs[idx]) - target).mean()
    return total


def bare_hidden_state_alignment(context, taps, config, ids):
    with torch.no_grad():
        context.teacher(input_ids=ids, use_cache=False)
    total = 0.0
    for idx, mixer in context.mixers.items():
        output, _ = mixer(taps.inputs[idx])
        target = taps.outputs[idx]
        total = total + ((output - target).norm(dim=-1) / target.norm(dim=-1)).mean()
    return total


def bare_knowledge_distillation(context, taps, config, ids):
    with torch.no_grad():
        teacher_logits = context.teacher(input_ids=ids, use_cache=False).logits
    student_logits = context.student(input_ids=ids, use_cache=False).logits
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.view(-1, vocab), -1),
                    F.log_softmax(teacher_logits.view(-1, vocab), -1), log_target=True, reduction="batchmean")


BARE = {"matrix_orientation": bare_matrix_orientation, "hidden_state_alignment": bare_hidden_state_alignment,
        "knowledge_distillation": bare_knowledge_distillation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per stage (plus one warm-up step)")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    torch.set_num_threads(recipe.threads or torch.get_num_threads())
    teacher, _ = load_teacher(recipe.teacher)
    adapter = find_adapter(teacher.config)
    mixer_cls = get_mixer(recipe.student.mixer.name)
    student = build_student(teacher, adapter, mixer_cls, recipe.student.mixer.config, recipe.student.keep_attention)
    context = StageContext(teacher, student, adapter, mixer_layers(student, adapter))
    generator = torch.Generator().manual_seed(0)
    print(f"{RECIPE.name}: {len(context.mixers)} × {recipe.student.mixer.name}, {args.steps} steps per stage "
          f"after one warm-up step, {torch.get_num_threads()} threads, fp32")
    print(f"{'stage':<26}{'batch':>10}{'mixerdistill tok/s':>20}{'bare loop tok/s':>18}{'ratio':>8}")
    for block in recipe.stages:
        stage_cls = get_stage(block.name)
        config = block.config
        per_step = config.batch_size * config.seq_len
        batches = [torch.randint(0, teacher.config.vocab_size, (config.batch_size, config.seq_len),
                                 generator=generator) for _ in range(args.steps + 1)]
        config = config.model_copy(update={"tokens": len(batches) * per_step})
        stage = stage_cls(config, context)
        with tempfile.TemporaryDirectory() as folder:
            result = train_stage(stage, block.name, student, iter(batches), Path(folder) / "metrics.jsonl",
                                 torch.device("cpu"), show_progress=False)
        framework = result.tokens / result.seconds  # both timings include the warm-up step

        parameters = stage.trainable_parameters()
        train_only(student, parameters)
        optimizer = build_optimizer(parameters, config.optimizer)
        taps = AttentionTaps(context)
        start = time.perf_counter()
        for ids in batches:
            loss = BARE[block.name](context, taps, config, ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        plain = len(batches) * per_step / (time.perf_counter() - start)
        for handle in taps.handles:
            handle.remove()
        print(f"{block.name:<26}{f'{config.batch_size}×{config.seq_len}':>10}{framework:>20.1f}{plain:>18.1f}"
              f"{framework / plain:>8.2f}")


if __name__ == "__main__":
    main()
