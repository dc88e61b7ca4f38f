"""A short real-teacher run: SmolLM2-135M → discrete Mamba-2 on Austen, through the CLI."""

from __future__ import annotations

import pytest

from conftest import short_real_run


@pytest.mark.slow
@pytest.mark.ci  # the short real-teacher run CI keeps
def test_short_smollm2_run_learns(tmp_path):
    output = tmp_path / "run"
    report = short_real_run(
        output,
        "smollm2_mamba.yaml",
        kd_options=", freeze: [mlp, norms, embeddings]",
        overrides=(
            "eval.lm_eval.limit=4",
            "eval.after_each_stage=true",
            "data.mix.1.samples=32",
            "eval.domain_tokens=512",
        ),
    )
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
