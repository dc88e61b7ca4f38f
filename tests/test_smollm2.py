"""A short real-teacher run: SmolLM2-135M → discrete Mamba-2 on Austen, through the CLI."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, run_cli


@pytest.mark.slow
@pytest.mark.ci  # the short real-teacher run CI keeps
def test_short_smollm2_run_learns(tmp_path):
    output = tmp_path / "run"
    stage = "{name: %s, tokens: 512, batch_size: 2, seq_len: 128, optimizer: {lr: 1.0e-3}%s}"
    stages = ", ".join(
        [
            stage % ("matrix_orientation", ""),
            stage % ("hidden_state_alignment", ", distance: relative"),
            stage % ("knowledge_distillation", ", freeze: [mlp, norms, embeddings]"),
        ]
    )
    result = run_cli(
        "run",
        str(REPO / "recipes" / "smollm2_mamba.yaml"),
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
        "eval.lm_eval.limit=4",
        "--set",
        "eval.after_each_stage=true",
        "--set",
        "data.mix.1.samples=32",
        "--set",
        "eval.domain_tokens=512",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((output / "report.json").read_text())
    assert report["student"]["mixers"] == {"discrete_mamba2": 30}
    assert 10 < report["teacher"]["perplexity"] < 100  # SmolLM2 on Persuasion: ~45
    assert report["student"]["perplexity"] < report["student"]["perplexity_after_transfer"]
    assert [s["tokens"] for s in report["stages"]] == [512, 512, 512]
    assert report["samples"]["teacher"].strip()
    # the recipe's offline lm-eval tasks ran on both models; SmolLM2 reads Austen far better than bytes at random
    evaluation = report["eval"]
    assert set(evaluation["student"]["scores"]) == {"austen_ppl", "austen_cloze", "austen_choice"}
    assert 0 < evaluation["teacher"]["scores"]["austen_ppl"]["bits_per_byte"] < 2
    assert "## lm-eval" in (output / "report.md").read_text()
