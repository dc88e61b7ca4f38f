"""Decode benchmark: per-token latency and cache memory of a SmolLM2-135M student (a constant-size recurrent
state per layer) against its teacher (a KV cache growing with the context), fp32 on the CPU.

The teacher is the offline SmolLM2-135M-Instruct of ``recipes/smollm2_mamba.yaml``; the student is that
recipe's discrete Mamba-2 student built from it (30 of 30 layers replaced; weights transferred, not
trained: speed does not depend on training). For each batch size and context length the cache is filled
**synthetically**, because a real 8K prefill of the teacher at batch 8 takes far too long on a CPU: the
teacher's KV layers get random keys and values of the context length, the student's mixer layers random
states (whose size does not depend on the context) and the same token count. A decode step's cost
depends only on the sizes of the cache, not on its contents, so the figures are those of decoding after
a real prompt of that length. Then ~16 tokens are decoded greedily, each a single-token forward through
transformers with the model's own cache (``DynamicCache``: the teacher's grows by concatenation, the
student's ``MixerCacheLayer`` states are replaced in place), and the median time per token is reported
together with the cache's tensor bytes and the growth of the process's resident memory.

    python benchmarks/decode.py [--quick] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from mixerdistill.bench import RESULTS_DIR, SMOLLM2_RECIPE, PeakMemory, machine, print_table, smollm2, write_result
from mixerdistill.generation import next_token_logits
from mixerdistill.student import cache_tensor_bytes, mixer_cache_layer, mixer_layers
from mixerdistill.teacher import TeacherAdapter

NAME = "decode"
CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
BATCHES = (1, 8)
TOKENS, WARMUP = 16, 2
QUICK = dict(contexts=(256, 2048), batches=(1,), tokens=4, warmup=1)
MIB = 2**20
TARGETS = {"student_latency_deviation_at_most": 0.15, "speedup_at_longest_context_at_least": 3.0}


def smollm2_pair() -> tuple[nn.Module, nn.Module, TeacherAdapter]:
    """(teacher, untrained student, adapter) from ``recipes/smollm2_mamba.yaml``."""
    from mixerdistill.student import build_student

    recipe, teacher, adapter, mixer_cls = smollm2()
    torch.manual_seed(recipe.seed)
    student = build_student(teacher, adapter, mixer_cls, recipe.student.mixer.config, recipe.kept_layers())
    return teacher, student.eval(), adapter


def filled_cache(model: nn.Module, adapter: TeacherAdapter, batch: int, context: int) -> DynamicCache:
    """A cache as if ``context`` tokens had been seen: mixer layers hold random states, attention layers
    random keys and values (B, H_kv, context, head_dim)."""
    config = model.config
    mixers = mixer_layers(model, adapter)
    cache = DynamicCache(config=config)
    for idx in range(len(adapter.layers(model))):
        if idx in mixers:
            entry = mixer_cache_layer(cache, idx)
            entry.state = {name: torch.randn_like(t) for name, t in mixers[idx].init_state(batch).items()}
            entry.seen = context
        else:
            geometry = adapter.geometry(config, idx)
            keys = torch.randn(batch, geometry.num_kv_heads, context, geometry.head_dim)
            cache.update(keys, torch.randn_like(keys), idx)
    return cache


@torch.no_grad()
def decode_seconds(model: nn.Module, cache: DynamicCache, batch: int, tokens: int, warmup: int) -> list[float]:
    """Wall time of each of ``tokens`` greedy single-token steps after ``warmup`` untimed ones."""
    input_ids = torch.randint(model.config.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(warmup + tokens):
        start = time.perf_counter()
        input_ids = next_token_logits(model, input_ids, cache).argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def measure(
    label: str, model: nn.Module, adapter: TeacherAdapter, batch: int, context: int, tokens: int, warmup: int
) -> dict:
    """One row: median ms per token, tokens/s, cache bytes (kv and state) and resident-memory growth."""
    gc.collect()
    torch.manual_seed(context)
    with PeakMemory() as memory:
        cache = filled_cache(model, adapter, batch, context)
        seconds = statistics.median(decode_seconds(model, cache, batch, tokens, warmup))
    sizes = cache_tensor_bytes(cache)
    row = {
        "model": label,
        "batch": batch,
        "context": context,
        "ms_per_token": 1e3 * seconds,
        "tokens_per_s": batch / seconds,
        "kv_mib": sizes["kv"] / MIB,
        "state_mib": sizes["state"] / MIB,
        "cache_bytes": sizes["kv"] + sizes["state"],
        "rss_growth_mib": memory.bytes / MIB,
    }
    del cache
    return row


def summarise(rows: list[dict], batches, contexts) -> dict:
    """Per batch size: the student's and teacher's latency deviation (largest |latency / median − 1| over
    the contexts: "flat within ±x"), whether the student's state size is constant, and the teacher/student
    time-per-token ratio at the longest context."""
    summary = {}
    for batch in batches:
        student, teacher = (
            {r["context"]: r for r in rows if r["model"] == label and r["batch"] == batch}
            for label in ("student", "teacher")
        )
        latencies = [student[c]["ms_per_token"] for c in contexts]
        teacher_latencies = [teacher[c]["ms_per_token"] for c in contexts]
        longest = max(contexts)
        prefix = f"batch{batch}_"
        summary |= {
            prefix + "student_latency_deviation": _deviation(latencies),
            prefix + "teacher_latency_deviation": _deviation(teacher_latencies),
            prefix + "student_state_bytes_constant": len({student[c]["cache_bytes"] for c in contexts}) == 1,
            prefix + "student_state_mib": round(student[longest]["state_mib"], 2),
            prefix + f"teacher_kv_mib_T{longest}": round(teacher[longest]["kv_mib"], 1),
            prefix + f"speedup_T{longest}": round(
                teacher[longest]["ms_per_token"] / student[longest]["ms_per_token"], 2
            ),
        }
    return summary


def _deviation(latencies: list[float]) -> float:
    middle = statistics.median(latencies)
    return round(max(abs(latency / middle - 1) for latency in latencies), 3)


def run(quick: bool = False) -> dict:
    """Measure every (batch, context) for the student and the teacher; see the module docstring."""
    settings = QUICK if quick else dict(contexts=CONTEXTS, batches=BATCHES, tokens=TOKENS, warmup=WARMUP)
    load_before = os.getloadavg()[0]
    teacher, student, adapter = smollm2_pair()
    rows = []
    for batch in settings["batches"]:
        for context in settings["contexts"]:
            for label, model in (("student", student), ("teacher", teacher)):
                rows.append(measure(label, model, adapter, batch, context, settings["tokens"], settings["warmup"]))
    return {
        "benchmark": NAME,
        "machine": machine(),
        "quick": quick,
        "settings": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "dtype": "float32",
            "teacher_attention": teacher.config._attn_implementation,
            "recipe": SMOLLM2_RECIPE.name,
            "cache_fill": "synthetic",
        },
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "rows": rows,
        "summary": summarise(rows, settings["batches"], settings["contexts"]),
        "targets": TARGETS,
    }


def plot(result: dict, path: Path) -> None:
    """Per-token latency and cache size against the context, student and teacher, one line per batch size."""
    from mixerdistill.plots import pyplot

    plt = pyplot()
    figure, (latency, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, colour in (("student", "tab:blue"), ("teacher", "tab:red")):
        for batch, style in zip(result["settings"]["batches"], ("-o", "--s")):
            rows = [r for r in result["rows"] if r["model"] == label and r["batch"] == batch]
            contexts = [r["context"] for r in rows]
            name = f"{label}, batch {batch}"
            latency.plot(contexts, [r["ms_per_token"] for r in rows], style, color=colour, label=name)
            memory.plot(contexts, [r["cache_bytes"] / MIB for r in rows], style, color=colour, label=name)
    for axes, title, unit in (
        (latency, "decode time per token", "ms per token"),
        (memory, "cache (tensor bytes)", "MiB"),
    ):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("context (tokens in the cache)")
        axes.set_ylabel(unit)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    latency.set_ylim(bottom=0)
    memory.set_yscale("log")
    figure.suptitle(
        "SmolLM2-135M teacher (KV cache) vs discrete Mamba-2 student (recurrent state), fp32 CPU", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 256 and 2048, batch 1, 4 tokens")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="where decode.json/.png go")
    arguments = parser.parse_args(argv)
    result = run(arguments.quick)
    print_table(
        result["rows"],
        ["model", "batch", "context", "ms_per_token", "tokens_per_s", "kv_mib", "state_mib", "rss_growth_mib"],
    )
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    path = write_result(NAME, result, arguments.output_dir)
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return result
