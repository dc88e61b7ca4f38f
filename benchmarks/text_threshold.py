"""How many bytes of real files are NUL or not UTF-8: the measurement behind data.NON_TEXT_LIMIT.

    python benchmarks/text_threshold.py                      # this machine's text and binary files
    python benchmarks/text_threshold.py --group mine 'corpus/**/*.txt'

Prints, per group of files, the share of such bytes (first MiB of each file) and how many files the
limit refuses. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

from mixerdistill.data import NON_TEXT_LIMIT, non_text_bytes

SAMPLE_BYTES = 1 << 20
DEFAULT_GROUPS = {
    "text": [
        "/usr/share/doc/**/*.txt",
        "/usr/lib/python3*/**/*.py",
        "/usr/share/common-licenses/*",
        "/usr/share/i18n/locales/*",
        "/usr/share/perl/**/*.pm",
        "/usr/share/man/**/*.[0-9]",
        "docs/*.md",
    ],
    "binary": [
        "/usr/bin/*",
        "/usr/lib/x86_64-linux-gnu/*.so*",
        "/usr/lib/python3*/**/*.pyc",
        "/usr/share/**/*.png",
        "/usr/share/**/*.gz",
    ],
}
FILES_PER_PATTERN = 300


def shares(patterns: list[str]) -> list[float]:
    """The non-text share of each regular, non-empty file the patterns match (scripts with #! skipped
    among binaries is the caller's choice: they are text)."""
    values = []
    for pattern in patterns:
        files = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        for path in [p for p in files if p.is_file() and not p.is_symlink()][:FILES_PER_PATTERN]:
            data = path.read_bytes()[:SAMPLE_BYTES]
            if data and not data.startswith(b"#!"):
                nul, undecodable, _ = non_text_bytes(data)
                values.append((nul + undecodable) / len(data))
    return sorted(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--group",
        nargs="+",
        action="append",
        metavar=("NAME", "GLOB"),
        help="A group of files: its name, then glob patterns (repeatable).",
    )
    args = parser.parse_args()
    groups = {name: patterns for name, *patterns in args.group} if args.group else DEFAULT_GROUPS
    print(f"limit: {NON_TEXT_LIMIT:.2%} of the bytes NUL or not UTF-8")
    for name, patterns in groups.items():
        values = shares(patterns)
        if not values:
            print(f"{name}: no files")
            continue
        refused = sum(v > NON_TEXT_LIMIT for v in values)
        print(
            f"{name}: {len(values)} files; non-text share min {values[0]:.2e}, 1st percentile "
            f"{values[len(values) // 100]:.2e}, median {values[len(values) // 2]:.2e}, max {values[-1]:.2e}; "
            f"refused {refused} ({refused / len(values):.1%})"
        )


if __name__ == "__main__":
    main()
