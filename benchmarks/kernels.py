"""Forward + backward time of each mixer operator: PyTorch reference vs fused CUDA kernel, T = 512 … 8192.

    python benchmarks/kernels.py                 # on a CUDA machine with the `cuda` extra installed
    python benchmarks/kernels.py --lengths 256 512 --device cpu   # reference path only (a smoke run)

Prints a Markdown table (milliseconds per forward+backward, median of --repeats). Rows whose kernel is
not installed, or that run on CPU, say so instead of a time. Shapes follow SmolLM2-135M / Phi-Mamba heads:
B = 1, H = 9 (--heads), N = P = 64, chunk 64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mixerdistill.errors import UserError
from mixerdistill.ops.conv import causal_conv1d
from mixerdistill.ops.ssd import ssd


def inputs(length: int, heads: int, device: str, per_state: bool = False):
    x = torch.randn(1, length, heads, 64, device=device)
    log_a = -F.softplus(torch.randn(1, length, heads, *((64,) if per_state else ()), device=device) - 2)
    B, C = (torch.randn(1, length, heads, 64, device=device) / 8 for _ in range(2))
    return [t.requires_grad_() for t in (x, log_a, B, C)]


OPERATORS = {
    "SSD (mamba-ssm)": lambda T, H, d, k: (lambda a: ssd(*a, 64, kernel=k, library="mamba_ssm"), inputs(T, H, d)),
    "SSD (fla simple_gla)": lambda T, H, d, k: (lambda a: ssd(*a, 64, kernel=k, library="fla"), inputs(T, H, d)),
    "diagonal SSM (fla gla)": lambda T, H, d, k: (lambda a: ssd(*a, 64, kernel=k), inputs(T, H, d, per_state=True)),
    "causal conv1d": lambda T, H, d, k: (
        lambda a: (causal_conv1d(a[0], a[1], a[2], activation="silu", kernel=k)[0], a[0][:, :1, :1]),
        [
            torch.randn(1, H * 64 * 3, T, device=d).requires_grad_(),
            torch.randn(H * 64 * 3, 1, 4, device=d).requires_grad_(),
            torch.randn(H * 64 * 3, device=d).requires_grad_(),
        ],
    ),
}


def milliseconds(fn, args, repeats: int) -> float:
    def once():
        y, state = fn(args)
        (y.float().sum() + state.float().sum()).backward()

    once()  # warm-up (and kernel autotuning)
    times = []
    for _ in range(repeats):
        if args[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        if args[0].is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(
        f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}; "
        f"ms per forward+backward (median of {args.repeats})\n"
    )
    print("| operator | T | reference | kernel | speed-up |\n|---|---|---|---|---|")
    for name, build in OPERATORS.items():
        for length in args.lengths:
            row = []
            for kernel in ("reference", "cuda"):
                try:
                    fn, tensors = build(length, args.heads, args.device, kernel)
                    row.append(milliseconds(fn, tensors, args.repeats))
                except UserError as error:
                    row.append(str(error).split(", but ")[-1])
                except torch.OutOfMemoryError:
                    row.append("out of memory")
            speedup = f"{row[0] / row[1]:.1f}×" if all(isinstance(v, float) for v in row) else "–"
            cells = [f"{v:.2f}" if isinstance(v, float) else v for v in row]
            print(f"| {name} | {length} | {cells[0]} | {cells[1]} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
