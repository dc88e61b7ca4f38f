"""`mixerdistill ablate`: one stage-1 run per family, a table and a chart of held-out distances."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_TEACHER, run_cli
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.recipe import load_recipe

TINY = {
    "name": "tiny_ablation",
    "seed": 0,
    "threads": 1,
    "teacher": TINY_TEACHER,
    "student": {"mixer": {"name": "discrete_mamba2"}, "keep_attention": [0]},
    "data": {"source": "text", "paths": [str(REPO / "README.md")], "heldout_fraction": 0.2},
    "stages": [
        {"name": "matrix_orientation", "tokens": 512, "batch_size": 4, "seq_len": 32, "optimizer": {"lr": 1e-3}}
    ],
    "eval": {"tokens": 256, "seq_len": 32, "batch_size": 4, "after_each_stage": False, "prompt": None},
    "ablation": [
        {"name": "toeplitz", "max_len": 32},
        {"name": "discrete_mamba2", "chunk_size": 16},
        {"name": "toeplitz", "max_len": 4},
    ],
}


def write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow  # three stage-1 runs in subprocesses
def test_ablate_writes_table_chart_and_distances(tmp_path: Path):
    result = run_cli("ablate", str(write(tmp_path, TINY)), "--output", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary["families"]) == {"toeplitz_1", "discrete_mamba2", "toeplitz_2"}
    for entry in summary["families"].values():
        assert list(entry["distance_per_layer"]) == ["1"]  # layer 0 kept attention
        assert 0 < entry["distance_mean"] < 100
    assert summary["families"]["toeplitz_2"]["mixer"] == {"name": "toeplitz", "max_len": 4, "a_init": 0.9}
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "ablation.md").read_text()
    assert "| toeplitz_1 |" in table and "layer 1" in table and table in result.stdout


def test_ablation_entries_are_validated_with_yaml_paths(tmp_path: Path):
    bad = {**TINY, "ablation": [{"name": "toeplitz", "max_len": 0}, {"name": "semiseperable"}]}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, bad))
    message = str(info.value)
    assert "ablation.0.max_len" in message and "ablation.1.name" in message and "semiseparable" in message


def test_ablate_needs_families_and_a_stage_one(tmp_path: Path):
    from mixerdistill.ablation import run_ablation

    with pytest.raises(UserError, match="ablation"):
        run_ablation(load_recipe(write(tmp_path, {**TINY, "ablation": []})), tmp_path / "a")
    no_stage = {**TINY, "stages": [{**TINY["stages"][0], "name": "hidden_state_alignment"}]}
    with pytest.raises(UserError, match="matrix_orientation"):
        run_ablation(load_recipe(write(tmp_path, no_stage)), tmp_path / "b")
