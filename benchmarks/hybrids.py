"""Runs at the demo's budget grouped by configuration, seeds averaged (docs/hybrids.md, docs/smollm2.md).

    python benchmarks/hybrids.py [--name hybrids] "all-SSM=runs/a_s0,runs/a_s1" "uniform K=7=runs/u7_s0,runs/u7_s1" …

Each argument is ``LABEL=RUN[,RUN…]`` (the runs of one configuration, one per seed). Prints a markdown table
of student/teacher perplexity per unseen domain and their geometric mean — the mean over seeds ± half the
spread (max − min) — and writes benchmarks/results/NAME.json and NAME.png (geometric mean per
configuration, one dot per seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mixerdistill.run_report import RunReport

RESULTS = Path(__file__).parent / "results"


def figures(run: Path) -> dict[str, float]:
    """{domain: student/teacher perplexity, …, "geomean": their geometric mean} of one finished run."""
    student = RunReport.read(run).student
    ratios = {domain: row["ratio"] for domain, row in (student.domains or {}).items()}
    return {**ratios, "geomean": student.domain_ratio_geomean}


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {(max(values) - min(values)) / 2:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", help="LABEL=RUN[,RUN…]")
    parser.add_argument("--name", default="hybrids", help="results/NAME.json and NAME.png")
    arguments = parser.parse_args()
    groups = {}
    for argument in arguments.groups:
        label, _, runs = argument.rpartition("=")  # labels may hold "=" (K=7), paths do not
        groups[label] = [figures(Path(run)) for run in runs.split(",")]
    columns = list(next(iter(groups.values()))[0])
    print("| configuration | seeds | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for label, runs in groups.items():
        cells = [summary([run[column] for run in runs]) for column in columns]
        print(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{arguments.name}.json").write_text(json.dumps(groups, indent=2) + "\n")
    plot(groups, RESULTS / f"{arguments.name}.png")


def plot(groups: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.8))
    for position, runs in enumerate(groups.values()):
        values = [run["geomean"] for run in runs]
        axis.bar(position, statistics.fmean(values), color="tab:blue", alpha=0.5)
        axis.scatter([position] * len(values), values, color="black", s=12, zorder=3)
    axis.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    axis.axhline(1, color="grey", linewidth=0.8)
    axis.set_ylabel("student / teacher perplexity\n(geomean, unseen domains)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
