"""Hybrids by measurement: rank-layers (measures, ρ, resuming), keep_attention: {auto: K}, the sum mixer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from conftest import REPO, TINY_TEACHER, cli_in_process
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.logits import chunked_distillation_loss
from mixerdistill.plugins import get_mixer
from mixerdistill.ranking import LayerRanking, load_models, ranking_folder, spearman
from mixerdistill.recipe import load_recipe, validate_recipe
from mixerdistill.testing import check_mixer, random_attention_weights, rotary_for

MEASURES = {"kl", "ppl", "stage1", "stage2"}
SWA_MAMBA = {"parts": [{"name": "window_attention", "window": 4}, {"name": "discrete_mamba2", "chunk_size": 8}]}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Rankings are cached: each test gets an empty cache."""
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "cache"))


def tiny_recipe(tmp_path, **student) -> dict:
    """The 2-layer random Llama → discrete Mamba-2, a short ranking, one short stage 2."""
    return {
        "name": "hybrid-test",
        "seed": 0,
        "threads": 1,
        "teacher": copy.deepcopy(TINY_TEACHER),
        "student": {"mixer": {"name": "discrete_mamba2", "chunk_size": 16}, **student},
        "data": {"source": "text", "paths": [str(REPO / "README.md"), str(REPO / "docs" / "*.md")]},
        "ranking": {"tokens": 512, "batch_size": 4, "seq_len": 64, "heldout_tokens": 512},
        "stages": [{"name": "hidden_state_alignment", "tokens": 512, "batch_size": 4, "seq_len": 64}],
        "eval": {"tokens": 256, "seq_len": 64, "batch_size": 4, "prompt": None},
    }


def write(tmp_path, recipe: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_spearman_is_the_correlation_of_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)  # ties share their mean rank
    assert spearman([1, 1], [1, 2]) is None and spearman([1], [1]) is None


def test_rank_layers_measures_every_layer_and_resumes(tmp_path):
    path = write(tmp_path, tiny_recipe(tmp_path))
    code, output = cli_in_process(
        "rank-layers", str(path), "-o", str(tmp_path / "out"), "--layer", "1", "--no-progress"
    )
    assert code == 0, output
    cache = ranking_folder(load_recipe(path))
    first = {name: (cache / name).stat().st_mtime_ns for name in ("layer_1.json", "layer_1.safetensors")}

    code, output = cli_in_process("rank-layers", str(path), "-o", str(tmp_path / "out"), "--no-progress")
    assert code == 0, output
    result = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert set(result["layers"]) == {"0", "1"}
    assert all(MEASURES <= set(scores) for scores in result["layers"].values())
    assert set(result["spearman_vs_kl"]) == {"ppl", "stage1", "stage2"}
    assert all(sorted(order) == [0, 1] for order in result["order"].values())
    assert (tmp_path / "out" / "ranking.md").is_file() and (tmp_path / "out" / "ranking.png").is_file()
    # the rerun aligned and measured only the layer the first run had not: layer 1 was left as it was
    assert [entry["layers"] for entry in json.loads((cache / "alignment.json").read_text())] == [[1], [0]]
    assert first == {name: (cache / name).stat().st_mtime_ns for name in first}

    code, output = cli_in_process("rank-layers", str(path), "-o", str(tmp_path / "out"), "--set", "ranking.lr=0.01")
    assert code == 2 and "other settings" in output


def test_kl_is_that_of_the_student_with_only_that_layer_replaced(tmp_path):
    recipe = load_recipe(write(tmp_path, tiny_recipe(tmp_path)))
    models = load_models(recipe, torch.device("cpu"), show_progress=False)
    ranking = LayerRanking(recipe, models, ranking_folder(recipe), show_progress=False)
    scores = ranking.run([0], ["kl", "ppl"])[0]
    student = ranking.student([0], aligned=True)
    with torch.no_grad():
        kl = [chunked_distillation_loss(student, models.teacher, models.windows[i : i + 4], 1.0) for i in (0, 4)]
    expected_kl = sum(loss.kl for loss in kl) / 2
    expected_ppl = torch.exp(sum(loss.ce for loss in kl) / 2)
    assert scores["kl"] == pytest.approx(expected_kl.item(), rel=1e-4)
    assert scores["ppl"] == pytest.approx(expected_ppl.item(), rel=1e-4)
    assert "stage2" not in scores


def test_keep_attention_auto_is_resolved_and_recorded(tmp_path):
    from mixerdistill.run import execute

    recipe = load_recipe(write(tmp_path, tiny_recipe(tmp_path, keep_attention={"auto": 1, "by": "stage2"})))
    report = execute(recipe, tmp_path / "run", show_progress=False)
    ranking = json.loads((ranking_folder(recipe) / "ranking.json").read_text())
    chosen = ranking["order"]["stage2"][:1]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["student"]["keep_attention"] == chosen
    assert report.student.keep_attention == chosen and report.student.keep_attention_by == "stage2"
    assert report.student.mixers == {"attention": 1, "discrete_mamba2": 1}
    assert f"Attention kept in layers {chosen[0]}" in (tmp_path / "run" / "report.md").read_text()


def test_keep_attention_auto_refuses_impossible_counts(tmp_path):
    with pytest.raises(RecipeError, match=r"student\.keep_attention\.auto: Input should be greater than or equal to 1"):
        validate_recipe(tiny_recipe(tmp_path, keep_attention={"auto": 0}))
    with pytest.raises(RecipeError, match=r"student\.keep_attention\.by: .*'stage2'"):
        validate_recipe(tiny_recipe(tmp_path, keep_attention={"auto": 1, "by": "loss"}))
    assert validate_recipe(tiny_recipe(tmp_path, keep_attention=[1])).student.keep_attention == [1]

    from mixerdistill.run import execute

    recipe = load_recipe(write(tmp_path, tiny_recipe(tmp_path, keep_attention={"auto": 2})))
    with pytest.raises(UserError, match="choose K from 1 to 1"):
        execute(recipe, tmp_path / "run", show_progress=False)


def test_sum_of_window_attention_and_mamba_conforms_and_starts_as_the_window():
    cls = get_mixer("sum")
    report = check_mixer(cls, cls.Config(**SWA_MAMBA))  # includes: a loop of step equals forward
    assert report.errors["forward vs step"] < 1e-9
    assert set(report.state_shapes) == {"0.k", "0.v", "0.seen", "1.conv", "1.ssm"}
    assert report.state_shapes["0.k"] == (2, 3, 2, 8)  # the window's last W − 1 keys: constant size

    from mixerdistill.testing import tiny_geometry_value

    geometry = tiny_geometry_value()
    weights = random_attention_weights(geometry, torch.Generator().manual_seed(0), torch.float64)
    composite = cls.from_attention(weights, geometry, cls.Config(**SWA_MAMBA)).double()
    window_cls = get_mixer("window_attention")
    window = window_cls.from_attention(weights, geometry, window_cls.Config(window=4)).double()
    u = torch.randn(2, 9, geometry.hidden_size, dtype=torch.float64)
    rotary = rotary_for(9, geometry.rotary_dim, 2, torch.float64)
    assert torch.allclose(composite(u, rotary=rotary)[0], window(u, rotary=rotary)[0], atol=1e-12)
    assert composite.scales.tolist() == [1.0, 0.0]


def test_sum_parts_are_validated_with_their_paths(tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["student"]["mixer"] = {
        "name": "sum",
        "parts": [{"name": "window_attention", "windw": 64}, {"name": "attention"}],
    }
    with pytest.raises(RecipeError) as error:
        validate_recipe(recipe)
    problems = dict(error.value.problems)
    assert "did you mean 'window'" in problems["student.mixer.parts.0.windw"]
    assert "window_attention" in problems["student.mixer.parts.1.name"]


def test_a_sum_student_exports_and_the_folder_computes_what_mixerdistill_does(tmp_path):
    """The exported folder builds the parts from the classes shipped beside it (no plugin registry): same
    logits and greedy tokens as mixerdistill's student, both parts contributing."""
    from transformers import AutoModelForCausalLM

    from mixerdistill.checkpoint import load_student
    from mixerdistill.generation import stream_tokens
    from mixerdistill.harness import find_checkpoint
    from mixerdistill.run import execute

    recipe = tiny_recipe(tmp_path)
    recipe["student"]["mixer"] = {"name": "sum", **SWA_MAMBA, "scales": [0.8, 0.5]}
    recipe["stages"] = []
    execute(load_recipe(write(tmp_path, recipe)), tmp_path / "run", show_progress=False)
    # a folder name of its own: transformers caches remote code by folder name within a process
    code, output = cli_in_process("export", str(tmp_path / "run"), "--to", str(tmp_path / "sum_export"))
    assert code == 0, output
    modeling = (tmp_path / "sum_export" / "modeling_mixerdistill.py").read_text()
    assert '"window_attention": _WindowAttention' in modeling and '"discrete_mamba2": _DiscreteMamba2' in modeling

    student, _ = load_student(find_checkpoint(tmp_path / "run"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sum_export", trust_remote_code=True).eval()
    ids = torch.randint(3, 200, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (exported(input_ids=ids).logits - student(input_ids=ids).logits).abs().max() <= 1e-5
        greedy = exported.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, ids.shape[1] :]
    assert torch.equal(greedy, torch.stack(list(stream_tokens(student.eval(), ids, 6)), dim=1))
