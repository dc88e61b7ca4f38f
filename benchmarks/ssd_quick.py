"""Time SSD forward+backward: materialised matrix vs chunked, SmolLM2 shapes (B=1, H=9, N=P=64), on CPU.

    python benchmarks/ssd_quick.py [--lengths 512 2048] [--chunks 64 128 256] [--repeats 3]

Prints figures only; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mixerdistill.ops.ssd import ssd_chunked, ssd_materialised_matrix


def inputs(T: int, batch: int = 1, H: int = 9, N: int = 64, P: int = 64):
    """x (B, T, H, P), log_a (B, T, H), B and C (B, T, H, N), all requiring grad."""
    x = torch.randn(batch, T, H, P)
    log_a = -F.softplus(torch.randn(batch, T, H) - 2.0)
    B, C = torch.randn(batch, T, H, N) / N**0.5, torch.randn(batch, T, H, N) / N**0.5
    return [t.requires_grad_() for t in (x, log_a, B, C)]


def materialised(x, log_a, B, C):
    return (ssd_materialised_matrix(log_a, B, C) @ x.transpose(1, 2)).transpose(1, 2)


def seconds(fn, tensors, repeats: int) -> float:
    """Median wall time of forward + backward, after one warm-up run."""
    times = []
    for _ in range(repeats + 1):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        fn(*tensors).square().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward+backward, median of "
          f"{args.repeats}")
    for T in args.lengths:
        tensors = inputs(T)
        reference = seconds(materialised, tensors, args.repeats)
        print(f"T={T:5d}  materialised        {reference * 1e3:9.1f} ms")
        timings = {}
        for Q in args.chunks:
            timings[Q] = seconds(lambda *t, Q=Q: ssd_chunked(*t, chunk_size=Q)[0], tensors, args.repeats)
            print(f"T={T:5d}  chunked Q={Q:<4d}      {timings[Q] * 1e3:9.1f} ms  ({reference / timings[Q]:5.1f}x)")
        best = min(timings, key=timings.get)
        print(f"T={T:5d}  fastest chunk size: {best}")


if __name__ == "__main__":
    main()
