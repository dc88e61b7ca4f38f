"""`recipes/tiny.yaml` end to end through the CLI: report, checkpoints, output protection, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_cli, tiny_llama
from mixerdistill.checkpoint import is_complete, load_student
from mixerdistill.plugins import get_mixer
from mixerdistill.student import build_student
from mixerdistill_plugins.families import LlamaAdapter

TINY = str(REPO / "recipes" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "tiny"
    result = run_cli("run", TINY, "--output", str(output), "--no-progress")
    assert result.returncode == 0, result.stderr
    return output


def test_tiny_recipe_report(tiny_run: Path):
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["student"]["mixers"] == {"discrete_mamba2": 4}
    assert report["teacher"]["perplexity"] > 1 and report["student"]["perplexity"] > 1
    assert report["student"]["perplexity_after_transfer"] > 1
    names = [s["name"] for s in report["stages"]]
    assert names == ["matrix_orientation", "hidden_state_alignment", "knowledge_distillation"]
    for stage in report["stages"]:
        assert stage["tokens"] > 0 and stage["seconds"] > 0 and stage["tokens_per_second"] > 0
        assert stage["loss_last"] < stage["loss_first"], stage
        assert 0.1 < stage["peak_rss_gb"] <= report["peak_rss_gb"]  # the process's peak, GNU time's maximum RSS
    assert "| teacher |" in (tiny_run / "report.md").read_text()
    assert f"peak resident memory {report['peak_rss_gb']:.2f} GB" in (tiny_run / "report.md").read_text()
    curve = report["curve"]  # eval.every_tokens: 16384 in tiny.yaml, 65536 training tokens in all
    assert [p["tokens"] for p in curve] == [0, 16384, 32768, 49152, 65536]
    assert curve[-1]["perplexity"] == report["student"]["perplexity"]
    steps = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == sum(s["steps"] for s in report["stages"])
    assert {"stage", "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second"} <= set(steps[0])
    recorded = (tiny_run / "recipe.yaml").read_text()
    assert "weight_decay" in recorded  # the resolved recipe spells out the defaults
    assert yaml.safe_load(recorded)["stages"][0]["matrix_loss"] == "materialised"  # `auto`, decided from shapes


def test_checkpoints_rebuild_the_student(tiny_run: Path):
    directory = tiny_run / "stage_3_knowledge_distillation"
    assert is_complete(directory)
    student, spec = load_student(directory)
    assert spec.mixer == "discrete_mamba2" and spec.adapter == "llama"
    again, _ = load_student(directory)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, again(input_ids=ids).logits)
    earlier, _ = load_student(tiny_run / "stage_1_matrix_orientation")
    with torch.no_grad():
        assert not torch.equal(student(input_ids=ids).logits, earlier(input_ids=ids).logits)


def test_existing_output_is_protected_and_resume_skips_finished_stages(tiny_run: Path):
    before = (tiny_run / "report.json").read_text()
    refused = run_cli("run", TINY, "--output", str(tiny_run), "--no-progress")
    assert refused.returncode == 2
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert (tiny_run / "report.json").read_text() == before
    resumed = run_cli("run", TINY, "--output", str(tiny_run), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("finished earlier") == 3
    report = json.loads((tiny_run / "report.json").read_text())
    assert [s["seconds"] for s in report["stages"]] == [s["seconds"] for s in json.loads(before)["stages"]]
    changed = run_cli("run", TINY, "--output", str(tiny_run), "--resume", "--set", "seed=5")
    assert changed.returncode == 2 and "recipe differs" in changed.stderr


def test_generate_with_cache_equals_without():
    teacher = tiny_llama(layers=2)
    adapter = LlamaAdapter()
    mixer = get_mixer("discrete_mamba2")
    torch.manual_seed(0)
    student = build_student(teacher, adapter, mixer, mixer.Config(chunk_size=4), keep_attention=[1])
    for p in student.parameters():  # move away from the transfer init so every path matters
        p.data.add_(0.02 * torch.randn_like(p))
    prompt = torch.randint(2, 256, (1, 9))
    common = dict(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        cached = student.generate(use_cache=True, **common)
        uncached = student.generate(use_cache=False, **common)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == prompt.shape[1] + 12
