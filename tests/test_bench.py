"""The benchmark plumbing: memory measurement, fresh-process runs, result structure and the CLI.

Timings are never asserted; these tests check that the figures exist, are sane and are written out.
"""

from __future__ import annotations

import json
import os

import torch

from conftest import cli_in_process
from mixerdistill import bench
from mixerdistill.bench import ssd


def allocate(megabytes: int) -> float:
    """Peak memory growth (MiB) while holding a ``megabytes`` MiB tensor (module level: runs in a subprocess)."""
    with bench.PeakMemory() as memory:
        block = torch.ones(megabytes * 2**18)  # fp32: 4 bytes each
        del block
    return memory.bytes / 2**20


def test_peak_memory_sees_a_freed_allocation_in_a_fresh_process():
    before = os.environ.get(bench.MMAP_THRESHOLD)
    assert 190 <= bench.in_subprocess(allocate, 200, track_memory=True) <= 260
    assert os.environ.get(bench.MMAP_THRESHOLD) == before  # the child's setting does not leak into this process


def test_ssd_benchmark_reports_every_path_with_linear_memory_for_chunked(tmp_path):
    result = ssd.run(lengths=[64, 256], chunks=[16, 32], repeats=1)
    paths = {(row["T"], row["path"]) for row in result["rows"]}
    assert paths == {(T, p) for T in (64, 256) for p in ("materialised", "chunked", "sequential")}
    chunked = [row for row in result["rows"] if row["path"] == "chunked"]
    assert all(row["chunk"] in (16, 32) and row["GFLOP"] > 0 and 0 < row["peak_fraction"] for row in chunked)
    assert all(row["forward_backward_ms"] > 0 and row["peak_MB"] >= 0 for row in result["rows"])
    assert set(result["summary"]) == {
        "speedup_fwd_bwd_T64",
        "peak_fraction_T64",
        "speedup_fwd_bwd_T256",
        "peak_fraction_T256",
    }
    path = bench.write_result("ssd", result, tmp_path)
    assert json.loads(path.read_text())["machine"]["matmul_peak_gflops"] > 0


def test_bench_cli_rejects_an_unknown_benchmark():
    code, output = cli_in_process("bench", "--only", "sdd")
    assert code == 2 and "unknown benchmark sdd" in output and "ssd" in output
