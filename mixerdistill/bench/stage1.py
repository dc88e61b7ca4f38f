"""Stage 1's matrix loss: materialised vs blockwise, time and peak memory, SmolLM2-135M shapes on CPU.

One layer of the real SmolLM2 teacher (softmax attention, 9 heads, 576 wide) against the demo recipe's
discrete Mamba-2 mixer built from it; input (1, T, 576) random unit-RMS hidden states with the teacher's
rotary. Each (T, mode) runs in a fresh process: loss forward + backward, median time, and the peak memory
growth over the process's state before the loss (rows are printed as they are measured). Unless
``--quick``, one real stage-1 step follows at T = 8192 (teacher forward, trace, blockwise loss and
backward) with ``--stage-layers`` replaced layers (default 4: each costs about 30 s at 8192 on 2 cores,
and memory per layer is what the per-layer rows show); it is timed in the memory-tracking process, so its
time is an upper bound.

    python benchmarks/stage1.py [--quick] [--lengths 256 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse

import torch

from mixerdistill.bench import PeakMemory, in_subprocess, machine, median_seconds, print_table, smollm2, write_result

LAYER = 15
MATERIALISED_MAX = 4096  # beyond this the (1, 9, T, T) fp32 matrices and their autograd buffers exceed 24 GB


def measure_layer(length: int, mode: str, block_rows: int, repeats: int) -> dict:
    """One layer's matrix loss forward + backward (run in a subprocess): median seconds over ``repeats``
    steps, or with ``repeats`` 0 the peak memory growth of the first step."""
    from mixerdistill.matrix_loss import matrix_distance
    from mixerdistill.stages import teacher_attention_mixer

    recipe, teacher, adapter, mixer_cls = smollm2()
    torch.set_num_threads(recipe.threads or torch.get_num_threads())
    teacher_layer = teacher_attention_mixer(teacher, adapter, LAYER)
    attention = adapter.attention(adapter.layers(teacher)[LAYER])
    student = mixer_cls.from_attention(
        adapter.attention_weights(attention), adapter.geometry(teacher.config, LAYER), recipe.student.mixer.config
    )
    torch.manual_seed(0)
    hidden = torch.randn(1, length, teacher.config.hidden_size)
    rotary = adapter.rotary(teacher, hidden, torch.arange(length)[None], LAYER)
    rows = None if mode == "materialised" else block_rows

    def step():
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            target = teacher_layer.matrix_rows(hidden, rotary)
        matrix_distance(student.matrix_rows(hidden, rotary), target, length, rows).mean().backward()

    if repeats == 0:
        with PeakMemory() as memory:
            step()
        return {"peak_MB": round(memory.bytes / 2**20, 1)}
    return {"seconds": round(median_seconds(step, repeats=repeats), 4)}


def measure_full_stage(length: int, block_rows: int, layers: int) -> dict:
    """One stage-1 step of the demo recipe (batch 1) at T = ``length`` with ``layers`` replaced layers in
    the middle of the model, the rest kept as attention (runs in a subprocess)."""
    import time

    from mixerdistill.plugins import get_stage
    from mixerdistill.stages import StageContext
    from mixerdistill.student import build_student, mixer_layers

    recipe, teacher, adapter, mixer_cls = smollm2()
    torch.set_num_threads(recipe.threads or torch.get_num_threads())
    depth = teacher.config.num_hidden_layers
    replaced = range((depth - layers) // 2, (depth - layers) // 2 + layers)
    keep = [idx for idx in range(depth) if idx not in replaced]
    student = build_student(teacher, adapter, mixer_cls, recipe.student.mixer.config, keep)
    context = StageContext(teacher, student, adapter, mixer_layers(student, adapter))
    stage_cls = get_stage("matrix_orientation")
    stage = stage_cls(
        stage_cls.Config(tokens=length, batch_size=1, seq_len=length, block_rows=block_rows, sink_tokens=1), context
    )
    ids = torch.randint(0, teacher.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with PeakMemory() as memory:
        start = time.perf_counter()
        loss, _ = stage.loss(ids)
        loss.backward()
        seconds = time.perf_counter() - start
    return {
        "T": length,
        "mode": f"blockwise, stage step, layers {replaced.start}-{replaced.stop - 1}",
        "seconds": round(seconds, 2),
        "peak_MB": round(memory.bytes / 2**20, 1),
    }


def run(
    quick: bool = False,
    lengths: list[int] | None = None,
    block_rows: int = 128,
    repeats: int = 3,
    full_stage: bool | None = None,
    stage_layers: int = 4,
) -> dict:
    lengths = lengths or ([512, 2048] if quick else [256, 512, 1024, 2048, 4096, 8192])
    repeats = 1 if quick else repeats
    rows = []
    for length in lengths:
        for mode in ("materialised", "blockwise"):
            if mode == "materialised" and length > MATERIALISED_MAX:
                continue
            rows.append(
                {
                    "T": length,
                    "mode": mode,
                    **in_subprocess(measure_layer, length, mode, block_rows, repeats),
                    **in_subprocess(measure_layer, length, mode, block_rows, 0, track_memory=True),
                }
            )
            print_table(rows[-1:], ["T", "mode", "seconds", "peak_MB"], header=len(rows) == 1)
    if full_stage if full_stage is not None else not quick:
        rows.append(in_subprocess(measure_full_stage, 8192, block_rows, stage_layers, track_memory=True))
        print_table(rows[-1:], ["T", "mode", "seconds", "peak_MB"], header=False)
    summary = {}
    by_key = {(row["T"], row["mode"]): row for row in rows}
    for length in lengths:
        whole, blocks = by_key.get((length, "materialised")), by_key.get((length, "blockwise"))
        if whole and blocks:
            summary[f"memory_ratio_T{length}"] = round(whole["peak_MB"] / max(blocks["peak_MB"], 1e-3), 1)
            summary[f"speedup_T{length}"] = round(whole["seconds"] / blocks["seconds"], 2)
    return {
        "benchmark": "stage1",
        "machine": machine(),
        "layer": LAYER,
        "block_rows": block_rows,
        "rows": rows,
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, 2048; one repeat; no whole-stage run")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--block-rows", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stage-layers", type=int, default=4, help="replaced layers in the T = 8192 stage step")
    parser.add_argument("--no-write", action="store_true", help="print only; keep benchmarks/results as it is")
    args = parser.parse_args(argv)
    print(
        f"stage-1 matrix loss, layer {LAYER} of SmolLM2-135M vs discrete Mamba-2, forward+backward, fp32, "
        f"{torch.get_num_threads()} threads, block_rows {args.block_rows}"
    )
    result = run(args.quick, args.lengths, args.block_rows, args.repeats, stage_layers=args.stage_layers)
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    if not args.no_write:
        print(f"wrote {write_result('stage1', result)}")
