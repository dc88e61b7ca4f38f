"""Delta-rule and mLSTM cells on CPU: materialised matrix vs chunked vs token-by-token recurrence.

SmolLM2-135M shapes: batch 1, H = 9 heads, head_dim 64 (keys and values), fp32, chunk 64. Cells: the gated
delta rule (Gated DeltaNet), the delta rule (DeltaNet) and the mLSTM. For each, forward (no grad) and
forward+backward (loss = Σ y²) times, and the peak memory of forward+backward (one fresh process per cell). The
materialised path stops at T = 2048 and the recurrence at T = 1024 (both grow faster than linearly).
The summary gives the chunked path's growth from T = 1024 to 8192 (8× the tokens): linear means ≈ 8×.

    python benchmarks/delta.py [--quick] [--lengths ...]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mixerdistill.bench import (
    RESULTS_DIR,
    PeakMemory,
    in_subprocess,
    machine,
    median_seconds,
    print_table,
    write_result,
)
from mixerdistill.ops.delta import delta_rule, delta_rule_matrix_rows, delta_rule_step
from mixerdistill.ops.mlstm import mlstm_chunked, mlstm_matrix_rows, mlstm_step

HEADS, HEAD_DIM, CHUNK = 9, 64, 64
LIMITS = {"materialised": 2048, "recurrent": 1024}  # longest T timed per path (chunked: all)
CELLS = ("gated_delta_rule", "delta_rule", "mlstm")


def inputs(cell: str, length: int, seed: int = 0) -> list[torch.Tensor]:
    """q, k (1, T, H, d), v (1, T, H, d) and two gates (1, T, H), all requiring grad.

    Delta rules: β and log α (DeltaNet ignores log α) and L2-normalised keys, as the layer has them;
    mLSTM: log f and ĩ.
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, length, HEADS, HEAD_DIM, generator=g) * HEAD_DIM**-0.5
    k = torch.randn(1, length, HEADS, HEAD_DIM, generator=g)
    v = torch.randn(1, length, HEADS, HEAD_DIM, generator=g)
    first, second = torch.randn(1, length, HEADS, generator=g), torch.randn(1, length, HEADS, generator=g)
    if cell == "mlstm":
        gates = [F.logsigmoid(first + 3.0), second]
    else:
        k = F.normalize(k, dim=-1)
        gates = [torch.sigmoid(first), -F.softplus(second - 2.0)]
    return [t.requires_grad_() for t in (q, k, v, *gates)]


def _log_alpha(cell: str, second: torch.Tensor, t: int | None = None) -> torch.Tensor | None:
    """log α for the gated delta rule (all tokens, or token t), None for DeltaNet."""
    if cell != "gated_delta_rule":
        return None
    return second if t is None else second[:, t]


def materialised(cell: str, q, k, v, first, second) -> torch.Tensor:
    if cell == "mlstm":
        M = mlstm_matrix_rows(q, k, first, second)(0, q.shape[1])
    else:
        M = delta_rule_matrix_rows(q, k, first, _log_alpha(cell, second), CHUNK)(0, q.shape[1])
    return (M @ v.transpose(1, 2)).transpose(1, 2)


def chunked(cell: str, q, k, v, first, second) -> torch.Tensor:
    if cell == "mlstm":
        return mlstm_chunked(q, k, v, first, second, CHUNK)[0]
    return delta_rule(q, k, v, first, _log_alpha(cell, second), CHUNK, kernel="reference")[0]


def recurrent(cell: str, q, k, v, first, second) -> torch.Tensor:
    shape = (1, HEADS, HEAD_DIM)
    state = (
        (q.new_zeros(*shape, HEAD_DIM), q.new_zeros(*shape), q.new_zeros(1, HEADS))
        if cell == "mlstm"
        else q.new_zeros(*shape, HEAD_DIM)
    )
    outputs = []
    for t in range(q.shape[1]):
        if cell == "mlstm":
            y_t, state = mlstm_step(q[:, t], k[:, t], v[:, t], first[:, t], second[:, t], state)
        else:
            y_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], first[:, t], _log_alpha(cell, second, t), state)
        outputs.append(y_t)
    return torch.stack(outputs, dim=1)


PATHS = {"materialised": materialised, "chunked": chunked, "recurrent": recurrent}


def timings(cell: str, path: str, length: int, repeats: int) -> dict:
    """Median wall milliseconds of forward (no grad) and forward+backward, and the CPU time (all threads) of
    forward+backward: on a shared machine the wall time follows the load, the CPU time much less."""
    fn, tensors = PATHS[path], inputs(cell, length)

    def forward():
        with torch.no_grad():
            fn(cell, *tensors)

    def forward_backward():
        for t in tensors:
            t.grad = None
        fn(cell, *tensors).square().sum().backward()

    forward_backward()  # warm-up
    cpu = []
    for _ in range(repeats):
        start = time.process_time()
        forward_backward()
        cpu.append(time.process_time() - start)
    return {
        "forward_ms": median_seconds(forward, repeats) * 1e3,
        "forward_backward_ms": median_seconds(forward_backward, repeats) * 1e3,
        "forward_backward_cpu_ms": min(cpu) * 1e3,
    }


def peak_memories_mb(cell: str, jobs: list[tuple[str, int]]) -> list[float]:
    """Peak memory growth (MiB) of one forward+backward per (path, T) in ``jobs``, inputs excluded.

    Call it with one job per fresh process (``in_subprocess(track_memory=True)``): large buffers go back to
    the system when freed, and the small ones (a chunk's (B, H, Q, d) tensors are under the mmap threshold)
    find no heap left over by an earlier, larger job, so the high-water mark follows this job's tensors.
    """
    peaks = []
    for path, length in jobs:
        tensors = inputs(cell, length)
        PATHS[path](cell, *[t.detach()[:, :8] for t in tensors])  # warm-up allocations
        with PeakMemory() as memory:
            PATHS[path](cell, *tensors).square().sum().backward()
        peaks.append(memory.bytes / 2**20)
        del tensors
    return peaks


def saved_mb(cell: str, path: str, length: int) -> float:
    """MiB of the tensors autograd keeps for the backward of one forward (distinct storages, inputs included):
    the memory that grows with T, measured in-process and independent of the allocator and the load."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        PATHS[path](cell, *inputs(cell, length)).square().sum()
    return sum(storages.values()) / 2**20


def run(
    quick: bool = False, lengths: list[int] | None = None, repeats: int = 3, cells=CELLS, peak: bool = True
) -> dict:
    lengths = lengths or ([512, 2048] if quick else [512, 1024, 2048, 4096, 8192])
    repeats = 1 if quick else repeats
    rows = []
    for cell in cells:
        jobs = [
            (path, length)
            for length in lengths
            for path in PATHS
            if length <= LIMITS.get(path, length) and not (quick and path == "recurrent")
        ]
        peaks = [in_subprocess(peak_memories_mb, cell, [job], track_memory=True)[0] if peak else None for job in jobs]
        for (path, length), peak_mb in zip(jobs, peaks):
            row = {
                "cell": cell,
                "T": length,
                "path": path,
                **timings(cell, path, length, 1 if path == "recurrent" else repeats),
                "saved_MB": saved_mb(cell, path, length),
                "peak_MB": peak_mb,
            }
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    summary = {}
    by_key = {(row["cell"], row["T"], row["path"]): row for row in rows}
    long = max(lengths)
    short = 1024 if 1024 in lengths and long > 1024 else min(lengths)  # the target: 1K → 8K tokens
    for cell in cells:
        first, last = by_key[(cell, short, "chunked")], by_key[(cell, long, "chunked")]
        if long > short:
            for key in ("forward_backward_ms", "forward_backward_cpu_ms"):
                summary[f"{cell}_{key.removesuffix('_ms')}_growth_T{short}_to_T{long}"] = round(
                    last[key] / first[key], 2
                )
            summary[f"{cell}_saved_growth_T{short}_to_T{long}"] = round(last["saved_MB"] / first["saved_MB"], 2)
            if peak:
                summary[f"{cell}_memory_growth_T{short}_to_T{long}"] = round(
                    last["peak_MB"] / max(first["peak_MB"], 1e-3), 2
                )
    return {
        "benchmark": "delta",
        "machine": machine(),
        "shape": {"B": 1, "H": HEADS, "d": HEAD_DIM, "chunk": CHUNK},
        "rows": rows,
        "summary": summary,
    }


def plot(result: dict, path) -> None:
    from mixerdistill.plots import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for cell in sorted({row["cell"] for row in result["rows"]}):
        for name, style in (("chunked", "o-"), ("materialised", "s--"), ("recurrent", "^:")):
            rows = [row for row in result["rows"] if row["cell"] == cell and row["path"] == name]
            if rows:
                lengths = [row["T"] for row in rows]
                axes[0].loglog(lengths, [row["forward_backward_ms"] for row in rows], style, label=f"{cell} {name}")
                axes[1].loglog(lengths, [row["saved_MB"] for row in rows], style, label=f"{cell} {name}")
    axes[0].set(xlabel="T (tokens)", ylabel="forward+backward (ms)", title="time, SmolLM2 shapes, CPU fp32")
    axes[1].set(xlabel="T (tokens)", ylabel="saved for backward (MiB)", title="autograd memory")
    for axis in axes:
        axis.grid(True, alpha=0.3)
    axes[1].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, 2048; one repeat; no recurrence")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument(
        "--no-peak",
        action="store_true",
        help="skip the fresh-process peak memory (slow on a busy "
        "machine); saved_MB, autograd's saved tensors, is always measured",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep benchmarks/results as it is")
    args = parser.parse_args(argv)
    result = run(args.quick, args.lengths, args.repeats, tuple(args.cells), peak=not args.no_peak)
    print(
        f"delta rule / mLSTM cells, B=1 H={HEADS} d={HEAD_DIM} chunk {CHUNK}, fp32, "
        f"{result['machine']['threads']} threads"
    )
    print_table(
        result["rows"],
        ["cell", "T", "path", "forward_ms", "forward_backward_ms", "forward_backward_cpu_ms", "saved_MB", "peak_MB"],
    )
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    if not args.no_write:
        print(f"wrote {write_result('delta', result)}")
        plot(result, RESULTS_DIR / "delta.png")
