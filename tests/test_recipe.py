"""Recipes: every shipped recipe validates; bad ones fail with the YAML path and a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli
from mixerdistill.errors import RecipeError
from mixerdistill.recipe import apply_overrides, load_recipe, validate_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_open_with_their_command(path):
    recipe = load_recipe(path)
    command = "ablate" if recipe.ablation else "run"  # an ablation recipe is run once per family by `ablate`
    assert path.read_text().splitlines()[0] == f"# mixerdistill {command} recipes/{path.name}"
    assert recipe.name


def tiny() -> dict:
    return yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())


def validate(data: dict):
    return validate_recipe(data, base_dir=REPO / "recipes")


def problems_of(data: dict) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as caught:
        validate(data)
    return caught.value.problems


def test_unknown_key_names_path_and_suggests():
    data = tiny()
    data["stages"][1]["optimiser"] = data["stages"][1].pop("optimizer")
    [(path, message)] = problems_of(data)
    assert path == "stages.1.optimiser"
    assert "did you mean 'optimizer'" in message


def test_unknown_core_key_suggests():
    data = tiny()
    data["eval"]["seqlen"] = 64
    [(path, message)] = problems_of(data)
    assert path == "eval.seqlen" and "did you mean 'seq_len'" in message


def test_wrong_type_names_path():
    data = tiny()
    data["stages"][0]["tokens"] = "many"
    [(path, message)] = problems_of(data)
    assert path == "stages.0.tokens"
    assert "'many'" in message


def test_out_of_range_number():
    data = tiny()
    data["stages"][2]["optimizer"]["lr"] = -1
    [(path, _)] = problems_of(data)
    assert path == "stages.2.optimizer.lr"


def test_unknown_mixer_suggests_registered_name():
    data = tiny()
    data["student"]["mixer"]["name"] = "discrete_mamba"
    [(path, message)] = problems_of(data)
    assert path == "student.mixer.name"
    assert "did you mean 'discrete_mamba2'" in message


def test_mixer_config_errors_are_prefixed():
    data = tiny()
    data["student"]["mixer"]["chunk_sise"] = 16
    [(path, message)] = problems_of(data)
    assert path == "student.mixer.chunk_sise" and "did you mean 'chunk_size'" in message


def test_teacher_source_union_paths_drop_the_tag():
    data = tiny()
    data["teacher"]["modeltype"] = data["teacher"].pop("model_type")
    paths = dict(problems_of(data))
    assert "teacher.model_type" in paths and "teacher.modeltype" in paths
    assert "did you mean 'model_type'" in paths["teacher.modeltype"]
    data = tiny()
    data["teacher"]["source"] = "hubb"
    [(path, message)] = problems_of(data)
    assert path == "teacher.source" and "did you mean 'hub'" in message


def test_every_problem_reported_at_once():
    data = tiny()
    data["seed"] = "x"
    data["stages"][0]["name"] = "matrix_orientaton"
    data["data"]["paths"] = ["no/such/file-*.txt"]
    paths = [p for p, _ in problems_of(data)]
    assert paths == ["seed", "data.paths", "stages.0.name"] or sorted(paths) == sorted(
        ["seed", "data.paths", "stages.0.name"]
    )


def test_overrides_set_values_and_list_items():
    data = tiny()
    apply_overrides(data, ["stages.0.optimizer.lr=3e-4", "student.keep_attention=[1, 2]", "eval.prompt=null"])
    recipe = validate(data)
    assert recipe.stages[0].config.optimizer.lr == 3e-4
    assert recipe.student.keep_attention == [1, 2]
    assert recipe.eval.prompt is None
    with pytest.raises(RecipeError) as caught:
        apply_overrides(tiny(), ["stages.7.tokens=5"])
    assert caught.value.problems[0][0] == "stages.7"


def test_resolved_recipe_round_trips():
    recipe = load_recipe(REPO / "recipes" / "tiny.yaml")
    resolved = recipe.resolved()
    assert resolved["stages"][0]["optimizer"]["weight_decay"] == 0.0  # stage-1 default
    assert validate(resolved).resolved() == resolved


def test_cli_validate_exit_codes(tmp_path: Path):
    good = run_cli("validate", *map(str, RECIPES))
    assert good.returncode == 0, good.stderr
    bad = tmp_path / "bad.yaml"
    data = tiny()
    data["student"]["mixer"]["name"] = "discrete_mamba"
    data["stages"][0]["optimizr"] = {}
    bad.write_text(yaml.safe_dump(data))
    result = run_cli("validate", str(bad))
    assert result.returncode == 2
    assert "student.mixer.name" in result.stderr and "discrete_mamba2" in result.stderr
    assert "stages.0.optimizr" in result.stderr and "did you mean 'optimizer'" in result.stderr
    assert "Traceback" not in result.stderr
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("name: [unclosed\n")
    result = run_cli("validate", str(malformed))
    assert result.returncode == 2 and "malformed YAML" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("run", str(bad), "--output", str(tmp_path / "never"))
    assert result.returncode == 2 and not (tmp_path / "never").exists()
