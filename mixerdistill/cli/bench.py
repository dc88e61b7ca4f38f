"""``mixerdistill bench``: the quick versions of the benchmarks in ``mixerdistill.bench``, one table."""

from __future__ import annotations

import importlib
from pathlib import Path

import typer

from mixerdistill.cli import app

BENCHMARKS = ["ssd", "delta", "stage1", "decode", "training"]


@app.command("bench")
def bench_command(
    only: list[str] = typer.Option([], "--only", help=f"Run only these: {', '.join(BENCHMARKS)}. Repeatable."),
    full: bool = typer.Option(
        False,
        "--full",
        help="The full sweeps benchmarks/<name>.py run (long: tens of minutes) instead of the quick ones.",
    ),
    write: Path = typer.Option(
        None, "--write", metavar="DIR", help="Also write each benchmark's result as DIR/<name>.json."
    ),
):
    """Measure SSD speed, stage-1 memory, training throughput and decoding on this machine; print one table.

    Figures only: nothing is compared against a threshold. docs/performance.md has the targets and the
    committed full results."""
    from mixerdistill.bench import machine, print_table, write_result
    from mixerdistill.errors import UserError

    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise UserError(f"--only: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    info = machine()
    typer.echo(
        f"{info['cpu']}, {info['threads']} threads, torch {info['torch']}, fp32 matmul peak "
        f"{info['matmul_peak_gflops']} GFLOP/s; {'full' if full else 'quick'} benchmarks"
    )
    figures = []
    for name in only or BENCHMARKS:
        typer.echo(f"... {name}", err=True)
        result = importlib.import_module(f"mixerdistill.bench.{name}").run(quick=not full)
        figures += [{"benchmark": name, "figure": key, "value": value} for key, value in result["summary"].items()]
        if write is not None:
            write_result(name, result, write)
    print_table(figures, ["benchmark", "figure", "value"])
