"""SSD (discrete Mamba-2's operator) on CPU: materialised matrix vs chunked vs token-by-token recurrence.

SmolLM2-135M shapes: batch 1, H = 9 heads, N = P = 64, fp32, T = 256 … 8192; forward and forward+backward
(loss = Σ y²). For the chunked path every chunk size in ``--chunks`` is timed and the fastest is reported,
with its counted FLOPs (torch's FlopCounterMode over forward+backward) as a fraction of the machine's
measured fp32 matmul peak, and the time its batched matmuls alone take on these shapes (the floor of
any implementation made of them). Peak memory of forward+backward is measured in a fresh process per (T, path).
The materialised path stops at T = 4096 (its T × T buffers would not fit in memory beyond).

    python benchmarks/ssd.py [--quick] [--lengths ...] [--chunks 32 64 128 256]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mixerdistill.bench import (
    RESULTS_DIR,
    PeakMemory,
    in_subprocess,
    machine,
    median_seconds,
    print_table,
    write_result,
)
from mixerdistill.ops.ssd import ssd_chunked, ssd_materialised_matrix, ssd_step

HEADS, STATE, HEAD_DIM = 9, 64, 64
MATERIALISED_MAX = 4096
SEQUENTIAL_MAX = 8192


def inputs(length: int, seed: int = 0) -> list[torch.Tensor]:
    """x (1, T, H, P), log_a (1, T, H), B and C (1, T, H, N), all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, HEADS, HEAD_DIM, generator=g)
    log_a = -F.softplus(torch.randn(1, length, HEADS, generator=g) - 2.0)
    B, C = (torch.randn(1, length, HEADS, STATE, generator=g) / STATE**0.5 for _ in range(2))
    return [t.requires_grad_() for t in (x, log_a, B, C)]


def materialised(x, log_a, B, C, chunk_size=None) -> torch.Tensor:
    return (ssd_materialised_matrix(log_a, B, C) @ x.transpose(1, 2)).transpose(1, 2)


def chunked(x, log_a, B, C, chunk_size=64) -> torch.Tensor:
    return ssd_chunked(x, log_a, B, C, chunk_size)[0]


def sequential(x, log_a, B, C, chunk_size=None) -> torch.Tensor:
    state = x.new_zeros(x.shape[0], HEADS, STATE, HEAD_DIM)
    outputs = []
    for t in range(x.shape[1]):
        y_t, state = ssd_step(x[:, t], log_a[:, t], B[:, t], C[:, t], state)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1)


PATHS = {"materialised": materialised, "chunked": chunked, "sequential": sequential}


def timings(path: str, length: int, chunk_size: int | None, repeats: int) -> dict:
    """Median seconds of forward (no grad) and forward+backward."""
    fn, tensors = PATHS[path], inputs(length)

    def forward():
        with torch.no_grad():
            fn(*tensors, chunk_size=chunk_size)

    def forward_backward():
        for t in tensors:
            t.grad = None
        fn(*tensors, chunk_size=chunk_size).square().sum().backward()

    return {
        "forward_ms": median_seconds(forward, repeats) * 1e3,
        "forward_backward_ms": median_seconds(forward_backward, repeats) * 1e3,
    }


def counted_gflop(length: int, chunk_size: int) -> float:
    """FLOPs torch counts for the chunked path's forward+backward (matmuls), in GFLOP."""
    tensors = inputs(length)
    with FlopCounterMode(display=False) as counter:
        chunked(*tensors, chunk_size=chunk_size).square().sum().backward()
    return counter.get_total_flops() / 1e9


def matmul_floor_ms(length: int, chunk_size: int, repeats: int) -> float:
    """Median time of the chunked path's twelve batched matmuls (4 forward, 8 backward) alone, on contiguous
    random operands of the same shapes: the floor for any implementation built from these products."""
    chunks = -(-length // chunk_size)
    shape = (1, HEADS, chunks, chunk_size)
    x, B, C = (torch.randn(*shape, width) for width in (HEAD_DIM, STATE, STATE))
    G, S = torch.randn(*shape, chunk_size), torch.randn(1, HEADS, chunks, STATE, HEAD_DIM)
    xT, BT, CT, GT, ST = (t.transpose(-1, -2).contiguous() for t in (x, B, C, G, S))

    def products():
        C @ BT, G @ x, BT @ x, C @ S  # forward: scores, intra-chunk output, chunk states, entering states
        GT @ x, x @ xT, G @ B, GT @ C, x @ ST, CT @ x, B @ S, x @ ST  # backward

    return median_seconds(products, repeats) * 1e3


def peak_memory_mb(path: str, length: int, chunk_size: int | None) -> float:
    """Peak memory growth (MiB) of one forward+backward, inputs excluded (runs in a subprocess)."""
    tensors = inputs(length)
    PATHS[path](*[t.detach()[:, :8] for t in tensors], chunk_size=chunk_size)  # warm-up allocations
    with PeakMemory() as memory:
        PATHS[path](*tensors, chunk_size=chunk_size).square().sum().backward()
    return memory.bytes / 2**20


def run(
    quick: bool = False, lengths: list[int] | None = None, chunks: list[int] | None = None, repeats: int = 3
) -> dict:
    lengths = lengths or ([512, 2048] if quick else [256, 512, 1024, 2048, 4096, 8192])
    chunks = chunks or ([64, 128] if quick else [32, 64, 128, 256])
    repeats = 2 if quick else repeats
    peak = machine()["matmul_peak_gflops"]
    rows, chunk_trials = [], []
    for length in lengths:
        per_chunk = {Q: timings("chunked", length, Q, repeats) for Q in chunks}
        chunk_trials += [{"T": length, "chunk": Q, **t} for Q, t in per_chunk.items()]
        best = min(per_chunk, key=lambda Q: per_chunk[Q]["forward_backward_ms"])
        gflop = counted_gflop(length, best)
        for path in PATHS:
            if (path == "materialised" and length > MATERIALISED_MAX) or (quick and path == "sequential"):
                continue
            chunk_size = best if path == "chunked" else None
            row = {
                "T": length,
                "path": path,
                "chunk": chunk_size,
                **(
                    per_chunk[best]
                    if path == "chunked"
                    else timings(path, length, None, 1 if path == "sequential" else repeats)
                ),
                "peak_MB": in_subprocess(peak_memory_mb, path, length, chunk_size, track_memory=True),
            }
            if path == "chunked":
                row["matmul_floor_ms"] = matmul_floor_ms(length, best, repeats)
                row["GFLOP"] = gflop
                row["GFLOP/s"] = gflop / (row["forward_backward_ms"] / 1e3)
                row["peak_fraction"] = row["GFLOP/s"] / peak
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    summary = {}
    by_key = {(row["T"], row["path"]): row for row in rows}
    for length in lengths:
        fast, slow = by_key.get((length, "chunked")), by_key.get((length, "materialised"))
        if fast and slow:
            summary[f"speedup_fwd_bwd_T{length}"] = round(slow["forward_backward_ms"] / fast["forward_backward_ms"], 1)
        if fast:
            summary[f"peak_fraction_T{length}"] = fast["peak_fraction"]
    return {
        "benchmark": "ssd",
        "machine": machine(),
        "shape": {"B": 1, "H": HEADS, "N": STATE, "P": HEAD_DIM},
        "rows": rows,
        "chunk_trials": chunk_trials,
        "summary": summary,
    }


def plot(result: dict, path) -> None:
    from mixerdistill.plots import pyplot

    plt = pyplot()
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name in PATHS:
        rows = [row for row in result["rows"] if row["path"] == name]
        if rows:
            lengths = [row["T"] for row in rows]
            time_axis.loglog(lengths, [row["forward_backward_ms"] for row in rows], "o-", label=name)
            memory_axis.loglog(lengths, [max(row["peak_MB"], 1e-1) for row in rows], "o-", label=name)
    time_axis.set(xlabel="T (tokens)", ylabel="forward+backward (ms)", title="SSD time, SmolLM2 shapes, CPU fp32")
    memory_axis.set(xlabel="T (tokens)", ylabel="peak memory growth (MiB)", title="SSD peak memory")
    lengths = sorted({row["T"] for row in result["rows"]})
    for axis in (time_axis, memory_axis):
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.minorticks_off()
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, 2048; chunks 64, 128; no recurrence")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--chunks", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; keep benchmarks/results as it is")
    args = parser.parse_args(argv)
    result = run(args.quick, args.lengths, args.chunks, args.repeats)
    print(
        f"SSD, B=1 H={HEADS} N=P={STATE}, fp32, {result['machine']['threads']} threads, "
        f"matmul peak {result['machine']['matmul_peak_gflops']} GFLOP/s"
    )
    print_table(
        result["rows"],
        [
            "T",
            "path",
            "chunk",
            "forward_ms",
            "forward_backward_ms",
            "matmul_floor_ms",
            "peak_MB",
            "GFLOP/s",
            "peak_fraction",
        ],
    )
    print("chunk sizes (chunked path):")
    print_table(result["chunk_trials"], ["T", "chunk", "forward_ms", "forward_backward_ms"])
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    if not args.no_write:
        print(f"wrote {write_result('ssd', result)}")
        plot(result, RESULTS_DIR / "ssd.png")
