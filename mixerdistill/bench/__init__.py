"""Benchmarks: measured figures for docs/performance.md and ``mixerdistill bench``.

Each module here (``ssd``, ``stage1``, ``decode``, ``training``) has ``run(quick: bool) -> dict`` returning
a JSON-ready result ``{"benchmark", "machine", "rows": [...], "summary": {...}}`` and ``main(argv)``
behind ``benchmarks/<name>.py``, which prints a table and writes ``benchmarks/results/<name>.json``.
Figures are measured, never asserted: a benchmark prints what it saw, targets are compared in the docs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from mixerdistill.recipe import resolve_recipe_path


def _results_dir() -> Path:
    """``benchmarks/results`` of the source checkout this package runs from, else of the working directory."""
    checkout = Path(__file__).resolve().parents[2]
    return (checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()) / "benchmarks" / "results"


RESULTS_DIR = _results_dir()


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@cache
def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul throughput (GFLOP/s): best of ``repeats`` square ``size`` matmuls,
    with torch's current thread count. The yardstick every "fraction of peak" figure divides by."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block, above what it held on entry (Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) on entry and reads ``VmHWM`` on exit;
    ``.bytes`` is the growth. Freed memory the allocator keeps can hide growth, so measure one thing per
    fresh process (``in_subprocess(..., track_memory=True)``).
    """

    def __enter__(self) -> PeakMemory:
        Path("/proc/self/clear_refs").write_text("5")
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = (_status_kib("VmHWM") - self.start) * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def in_subprocess(fn: Callable, *args, track_memory: bool = False):
    """``fn(*args)`` in a fresh interpreter (spawned, so nothing is inherited but the arguments); returns
    its result. ``fn`` must be a module-level function.

    ``track_memory`` fixes glibc's mmap threshold at 1 MiB in the child, so large buffers go back to the
    system when freed and resident memory follows the live tensors, not the allocator's retained heap
    (this makes allocation slower: time in a separate child).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    saved = os.environ.get(MMAP_THRESHOLD)
    if track_memory:
        os.environ[MMAP_THRESHOLD] = str(2**20)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        if saved is None:
            os.environ.pop(MMAP_THRESHOLD, None)
        else:
            os.environ[MMAP_THRESHOLD] = saved


MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "matmul_peak_gflops": round(matmul_peak_gflops(), 1),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_result(name: str, result: dict, directory: Path | None = None) -> Path:
    """Write ``result`` as ``<directory>/<name>.json`` (default ``benchmarks/results``); returns the path."""
    directory = Path(directory) if directory is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str], header: bool = True) -> None:
    """Print ``rows`` as an aligned plain-text table of ``columns`` (missing cells blank); columns are at
    least 14 wide, so tables printed a row at a time line up."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(14, len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    if header:
        print("  ".join(column.rjust(width) for column, width in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


SMOLLM2_RECIPE = resolve_recipe_path("smollm2_mamba")


def smollm2(recipe_path: Path = SMOLLM2_RECIPE):
    """(recipe, teacher, adapter, student mixer class) of the SmolLM2 demo recipe: the real offline teacher
    in fp32 and the recipe's mixer, for benchmarks at SmolLM2 shapes."""
    from transformers.utils import logging

    from mixerdistill.plugins import get_mixer
    from mixerdistill.recipe import load_recipe
    from mixerdistill.teacher import find_adapter
    from mixerdistill.teacher_sources import load_teacher

    logging.disable_progress_bar()
    recipe = load_recipe(recipe_path)
    if "kernel" in type(recipe.student.mixer.config).model_fields:  # CPU: the reference path, without its notice
        recipe = load_recipe(recipe_path, ["student.mixer.kernel=reference"])
    teacher, _ = load_teacher(recipe.teacher)
    return recipe, teacher, find_adapter(teacher.config), get_mixer(recipe.student.mixer.name)
