"""Training throughput of each stage of recipes/smollm2_mamba.yaml: tokens/s, counted FLOP/s as a fraction
of the machine's fp32 matmul peak, and the same work through a bare PyTorch loop.

The bare loops do the same work with the plainest code: one teacher forward with forward hooks that
keep what the stage needs, the student modules called directly, AdamW on the same trainable
parameters; no progress bar, no metrics file, no per-layer logging. FLOPs are what torch's
FlopCounterMode counts for one step's loss forward + backward (teacher forward included). Random
token batches at the recipe's batch size and length; prints figures, asserts nothing.

    python benchmarks/training.py [--quick] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mixerdistill.bench import machine, print_table, smollm2, write_result
from mixerdistill.optimizers import build_optimizer
from mixerdistill.plugins import get_stage
from mixerdistill.stages import StageContext
from mixerdistill.student import build_student, mixer_layers
from mixerdistill.training import Placement, Reporting, train_only, train_stage


class AttentionTaps:
    """Forward hooks on the teacher's attention modules keeping their inputs, outputs and the rotary."""

    def __init__(self, context):
        self.inputs, self.outputs, self.rotary = {}, {}, None
        self.handles = [
            context.adapter.attention(context.adapter.layers(context.teacher)[idx]).register_forward_hook(
                self._keep(idx), with_kwargs=True
            )
            for idx in context.mixers
        ]

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
            target[..., : config.sink_tokens] = 0
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
    return F.kl_div(
        F.log_softmax(student_logits.view(-1, vocab), -1),
        F.log_softmax(teacher_logits.view(-1, vocab), -1),
        log_target=True,
        reduction="batchmean",
    )


BARE = {
    "matrix_orientation": bare_matrix_orientation,
    "hidden_state_alignment": bare_hidden_state_alignment,
    "knowledge_distillation": bare_knowledge_distillation,
}


def counted_gflop(stage, ids: torch.Tensor) -> float:
    """GFLOP torch counts for one step's loss forward + backward.

    FlopCounterMode (torch 2.13) prices a grouped convolution's backward as if it were dense (734 GFLOP a
    step for the 30 depthwise convs here, against 0.4 forward); it is counted as twice the forward instead.
    """
    with FlopCounterMode(display=False) as counter:
        loss, _ = stage.loss(ids)
        loss.backward()
    stage.context.student.zero_grad(set_to_none=True)
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    convolution = counts.pop("aten.convolution", 0)
    counts.pop("aten.convolution_backward", None)
    return (sum(counts.values()) + 3 * convolution) / 1e9


def run(quick: bool = False, steps: int = 4) -> dict:
    steps = 1 if quick else steps
    recipe, teacher, adapter, mixer_cls = smollm2()
    torch.set_num_threads(recipe.threads or torch.get_num_threads())
    peak = machine()["matmul_peak_gflops"]
    student = build_student(teacher, adapter, mixer_cls, recipe.student.mixer.config, recipe.kept_layers())
    context = StageContext(teacher, student, adapter, mixer_layers(student, adapter))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for block in recipe.stages:
        stage_cls = get_stage(block.name)
        config = block.config
        per_step = config.batch_size * config.seq_len
        batches = [
            torch.randint(0, teacher.config.vocab_size, (config.batch_size, config.seq_len), generator=generator)
            for _ in range(steps + 1)
        ]
        config = config.model_copy(update={"tokens": len(batches) * per_step})
        stage = stage_cls(config, context)
        gflop = counted_gflop(stage, batches[0])  # also warms up the allocator before either loop is timed
        with tempfile.TemporaryDirectory() as folder:
            result = train_stage(
                stage,
                block.name,
                student,
                iter(batches),
                Placement(torch.device("cpu")),
                Reporting(Path(folder) / "metrics.jsonl", show_progress=False),
            )
        framework = result.tokens / result.seconds  # both timings include one more warm-up step

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
        achieved = gflop * framework / per_step
        rows.append(
            {
                "stage": block.name,
                "batch": f"{config.batch_size}x{config.seq_len}",
                "tokens_per_s": round(framework, 1),
                "bare_tokens_per_s": round(plain, 1),
                "ratio": round(framework / plain, 2),
                "GFLOP_per_step": round(gflop, 1),
                "GFLOP/s": round(achieved, 1),
                "peak_fraction": round(achieved / peak, 3),
            }
        )
    return {
        "benchmark": "training",
        "machine": machine(),
        "recipe": recipe.name,
        "steps": steps,
        "mixers": f"{len(context.mixers)} x {recipe.student.mixer.name}",
        "rows": rows,
        "summary": {f"{row['stage']}_tokens_per_s": row["tokens_per_s"] for row in rows}
        | {f"{row['stage']}_peak_fraction": row["peak_fraction"] for row in rows},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed step per stage")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per stage (plus one warm-up step)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep benchmarks/results as it is")
    args = parser.parse_args(argv)
    result = run(args.quick, args.steps)
    print(
        f"{result['recipe']}: {result['mixers']}, {result['steps']} steps per stage after one warm-up step, "
        f"{result['machine']['threads']} threads, fp32, matmul peak {result['machine']['matmul_peak_gflops']} "
        f"GFLOP/s"
    )
    print_table(
        result["rows"],
        ["stage", "batch", "tokens_per_s", "bare_tokens_per_s", "ratio", "GFLOP_per_step", "GFLOP/s", "peak_fraction"],
    )
    if not args.no_write:
        print(f"wrote {write_result('training', result)}")
