"""Evaluation: offline task generation, lm-eval on tiny students, eval/lm-eval/compare/inspect, plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, run_cli, tiny_llama
from mixerdistill.data import ByteTokenizer
from mixerdistill.lm_tasks import CHOICES, TASK_NAMES, write_tasks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def persuasion() -> str:
    from mixerdistill.austen import austen_novels

    return austen_novels()["Persuasion"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_generation_is_deterministic_and_well_formed(persuasion, tmp_path):
    write_tasks(persuasion, tmp_path / "a")
    write_tasks(persuasion, tmp_path / "b")
    for name in TASK_NAMES:
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    flat = " ".join(persuasion.split())
    choice = read_rows(tmp_path / "a" / "austen_choice.jsonl")
    assert len(choice) > 200
    for row in choice:
        assert len(row["choices"]) == CHOICES == len(set(row["choices"]))
        answer = row["choices"][row["label"]]
        assert f"{row['context']} {answer}" in flat  # the true next sentence follows the context in the novel
    assert len({row["label"] for row in choice}) == CHOICES  # the answer's position varies
    cloze = read_rows(tmp_path / "a" / "austen_cloze.jsonl")
    assert len(cloze) > 500
    for row in cloze:
        assert re.fullmatch(r" [A-Za-z]+", row["target"]) and row["context"] + row["target"] in flat
    passages = read_rows(tmp_path / "a" / "austen_ppl.jsonl")
    assert all(len(p["text"]) >= 2000 for p in passages) and "Sir Walter Elliot" in passages[0]["text"]
    config = (tmp_path / "a" / "austen_cloze.yaml").read_text()
    assert str((tmp_path / "a" / "austen_cloze.jsonl").resolve()) in config


def test_byte_tokenizer_as_transformers_keeps_the_ids():
    tokenizer = ByteTokenizer()
    converted = tokenizer.to_transformers()
    text = "Anne Elliot — naïve\n  café"
    ids = converted.encode(text, add_special_tokens=False)
    assert ids == tokenizer.encode(text)
    assert converted.decode(ids) == text and converted.eos_token_id == tokenizer.eos_token_id == 0


def test_lm_eval_scores_an_in_memory_student_beside_its_teacher():
    from mixerdistill.harness import EvalSettings, evaluate_pair
    from mixerdistill.plugins import get_mixer
    from mixerdistill.report import comparison_rows
    from mixerdistill.student import build_student
    from mixerdistill_plugins.families import LlamaAdapter

    teacher = tiny_llama()
    mixer = get_mixer("discrete_mamba2")
    student = build_student(teacher, LlamaAdapter(), mixer, mixer.Config(chunk_size=32), [])
    settings = EvalSettings(tasks=list(TASK_NAMES), limit=3, batch_size=2)
    entry = evaluate_pair(student, teacher, ByteTokenizer(), settings)
    for who in ("student", "teacher"):
        scores = entry[who]["scores"]
        assert set(scores) == set(TASK_NAMES) and entry[who]["samples"] == {t: 3 for t in TASK_NAMES}
        assert 0 <= scores["austen_choice"]["acc"] <= 1
        # an untrained byte model: about 8 bits per byte (uniform over 256 bytes is exactly 8)
        assert 4 < scores["austen_ppl"]["bits_per_byte"] < 12
    assert entry["student"]["scores"] != entry["teacher"]["scores"]
    rows = comparison_rows(entry)
    assert {(r["task"], r["metric"]) for r in rows} >= {("austen_ppl", "bits_per_byte"), ("austen_cloze", "acc")}
    ppl = next(r for r in rows if r["metric"] == "bits_per_byte")
    assert ppl["ratio"] == pytest.approx(ppl["student"] / ppl["teacher"])
    # The same model scored twice gives the same figures: the settings are identical and seeded.
    again = evaluate_pair(student, None, ByteTokenizer(), settings)
    assert again["student"]["scores"] == entry["student"]["scores"] and again["teacher"] is None


def test_run_plots_are_png_images(tmp_path):
    from mixerdistill.plots import layer_distances, read_stage_records, write_run_plots

    lines = []
    for stage, layered in (("matrix_orientation", True), ("knowledge_distillation", False)):
        for step in range(1, 13):
            record = {"stage": stage, "step": step, "tokens": 64 * step, "loss": 10.0 / step}
            if layered:
                record.update({"layer_0": 4.0 / step, "layer_1": 2.0 / step})
            lines.append(json.dumps(record))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert write_run_plots(tmp_path) == ["loss.png", "layer_distances.png"]
    for name in ("loss.png", "layer_distances.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    stages = read_stage_records(tmp_path / "metrics.jsonl")
    layers, first, last = layer_distances(stages[0][1])
    assert layers == [0, 1] and first[0] > last[0] and last[0] == pytest.approx(sum(4.0 / s for s in range(8, 13)) / 5)
    assert layer_distances(stages[1][1]) is None


# -- the command line on tiny runs (each CLI call loads torch and lm-eval) ---------------------
TINY = str(REPO / "recipes" / "tiny.yaml")
SHORT = [
    "--set",
    "stages.0.tokens=2048",
    "--set",
    "stages.1.tokens=2048",
    "--set",
    "stages.2.tokens=2048",
    "--set",
    "eval.every_tokens=null",
    "--set",
    "eval.tokens=1024",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny three-stage run with the recipe's lm-eval block, and the same recipe with stage 3 only."""
    root = tmp_path_factory.mktemp("eval_runs")
    full = run_cli(
        "run",
        TINY,
        "--output",
        str(root / "full"),
        *SHORT,
        "--set",
        "eval.lm_eval.tasks=[austen_cloze]",
        "--set",
        "eval.lm_eval.limit=4",
    )
    assert full.returncode == 0, full.stderr
    only_kd = run_cli(
        "run",
        TINY,
        "--output",
        str(root / "kd"),
        *SHORT,
        "--set",
        "stages=[{name: knowledge_distillation, tokens: 2048, batch_size: 8, seq_len: 128}]",
    )
    assert only_kd.returncode == 0, only_kd.stderr
    return root / "full", root / "kd"


@pytest.mark.slow
def test_recipe_eval_block_lands_in_the_report_with_plots(tiny_runs):
    run, _ = tiny_runs
    report = json.loads((run / "report.json").read_text())
    assert report["eval"]["tasks"] == ["austen_cloze"] and report["eval"]["limit"] == 4
    assert set(report["eval"]["teacher"]["scores"]["austen_cloze"]) == {"acc", "perplexity"}
    markdown = (run / "report.md").read_text()
    assert "## lm-eval" in markdown and "| austen_cloze | acc |" in markdown
    assert report["plots"] == ["loss.png", "layer_distances.png"]
    for name in report["plots"]:
        assert f"]({name})" in markdown and (run / name).read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_eval_command_and_lm_eval_passthrough_agree(tiny_runs, tmp_path):
    run, _ = tiny_runs
    result = run_cli(
        "eval", str(run), "--tasks", "austen_cloze,austen_choice", "--limit", "4", "--with-teacher", "--batch-size", "2"
    )
    assert result.returncode == 0, result.stderr
    assert "student / teacher" in result.stdout and "austen_choice" in result.stdout
    scores = json.loads((run / "eval.json").read_text())
    assert scores["checkpoint"].endswith("stage_3_knowledge_distillation")
    assert set(scores["teacher"]["scores"]) == set(scores["student"]["scores"]) == {"austen_cloze", "austen_choice"}

    out = tmp_path / "lm_eval_out"
    passthrough = run_cli(
        "lm-eval",
        "--",
        "run",
        "--model",
        "mixerdistill",
        "--model_args",
        f"pretrained={run}",
        "--tasks",
        "austen_cloze",
        "--limit",
        "4",
        "--output_path",
        str(out),
    )
    assert passthrough.returncode == 0, passthrough.stderr
    written = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["austen_cloze"]
    assert written["acc,none"] == scores["student"]["scores"]["austen_cloze"]["acc"]
    assert written["perplexity,none"] == pytest.approx(scores["student"]["scores"]["austen_cloze"]["perplexity"])

    bad = run_cli("eval", str(run), "--tasks", "austen_clozee")
    assert bad.returncode == 2 and "austen_clozee" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_compare_and_inspect(tiny_runs):
    full, kd = tiny_runs
    result = run_cli("compare", str(full), str(kd), "--json")
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["stages"] == ["matrix_orientation", "hidden_state_alignment", "knowledge_distillation"]
    assert second["stages"] == ["knowledge_distillation"]
    assert first["training_tokens"] == 3 * second["training_tokens"]
    assert "acc" in first["eval"]["student"]["austen_cloze"] and second["eval"]["student"] == {}
    table = run_cli("compare", str(full), str(kd))
    assert "1 + 2 + 3" in table.stdout and "student perplexity" in table.stdout

    inspected = run_cli("inspect", str(full), "--layer", "1", "--head", "2", "--tokens", "32")
    assert inspected.returncode == 0, inspected.stderr
    image = full / "inspect_layer1_head2.png"
    assert image.read_bytes().startswith(PNG_SIGNATURE) and "‖A_teacher − M_student‖_F" in inspected.stdout
    wrong = run_cli("inspect", str(full), "--layer", "9", "--head", "0")
    assert wrong.returncode == 2 and "--layer 9" in wrong.stderr
