"""Mixtures of data sources: seeded, resumable at the exact batch, shares as weighted; the recipe schema."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from mixerdistill.data import ByteTokenizer, TokenData
from mixerdistill.errors import RecipeError
from mixerdistill.mixture import MixedData, MixPart
from mixerdistill.plugins import get_dataset
from mixerdistill.recipe import load_recipe


def text_part(folder, name: str, letter: str, length: int, weight: float) -> MixPart:
    path = folder / f"{name}.txt"
    path.write_text("".join(letter + str(i % 10) for i in range(length // 2)))
    source_cls = get_dataset("text")
    source = source_cls(source_cls.Config.model_validate({"paths": [str(path)], "heldout_fraction": 0.1}))
    return MixPart(name, source, TokenData(source, ByteTokenizer()), weight)


@pytest.fixture
def mixture(tmp_path) -> MixedData:
    return MixedData([text_part(tmp_path, "a", "a", 4000, 3.0), text_part(tmp_path, "b", "b", 1000, 1.0)])


def take(iterator, count: int) -> list[torch.Tensor]:
    return [next(iterator) for _ in range(count)]


def test_mixture_resumes_at_the_exact_batch(mixture):
    whole = take(mixture.train_batches(4, 16, seed=5), 60)  # several passes over source b
    for start in (1, 17, 45):
        resumed = take(mixture.train_batches(4, 16, seed=5, start_batch=start), 60 - start)
        assert all(torch.equal(x, y) for x, y in zip(whole[start:], resumed))
    other = take(mixture.train_batches(4, 16, seed=6), 60)
    assert not all(torch.equal(x, y) for x, y in zip(whole, other))


def test_mixture_draws_by_weight_and_reports_shares(mixture):
    batches = torch.cat(take(mixture.train_batches(8, 16, seed=0), 100))
    from_a = (batches[:, 0] == ord("a")) | (batches[:, 1] == ord("a"))
    assert 0.7 < from_a.float().mean() < 0.8  # weight 3 : 1
    assert mixture.drawn_windows(8, 100, seed=0) == [int(from_a.sum()), int((~from_a).sum())]
    assert mixture.train_tokens == len(mixture.parts[0].data.train) + len(mixture.parts[1].data.train)
    assert torch.equal(mixture.heldout, mixture.parts[0].data.heldout)


def test_recipe_mix_validates_every_entry():
    recipe = load_recipe(
        REPO / "recipes" / "tiny.yaml",
        ["data={mix: [{source: text, paths: ['../README.md'], weight: 2}, {source: teacher_samples, samples: 8}]}"],
    )
    assert [p.source for p in recipe.data.mix] == ["text", "teacher_samples"]
    assert recipe.resolved()["data"]["mix"][1]["weight"] == 1.0
    with pytest.raises(RecipeError) as error:
        load_recipe(
            REPO / "recipes" / "tiny.yaml",
            ["data={mix: [{source: text, paths: ['../README.md'], wieght: 2}, {source: teacher_sample}]}"],
        )
    problems = dict(error.value.problems)
    assert "unknown field 'wieght'" in problems["data.mix.0.wieght"]
    assert "did you mean 'teacher_samples'" in problems["data.mix.1.source"]
    with pytest.raises(RecipeError, match="either `source` or `mix`"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["data={mix: [{source: austen}], source: austen}"])


def recipe_with_data(data: dict):
    return load_recipe(REPO / "recipes" / "tiny.yaml", [f"data={json.dumps(data)}"])


def test_prefix_source_is_a_data_block_validated_in_place():
    samples = {"source": "teacher_samples", "prefixes": {"data": {"source": "austen", "heldout": "Emma"}}}
    recipe = recipe_with_data({"mix": [{"source": "austen"}, samples]})
    resolved = recipe.resolved()["data"]["mix"][1]["prefixes"]
    assert resolved["data"] == {"source": "austen", "heldout": "Emma", "train": None, "heldout_fraction": 0.05}
    assert resolved["tokens"] == 32 and recipe.data.mix[1].config.prefixes.data.config.heldout == "Emma"
    misspelt = [
        {"source": "teacher_samples", "prefixes": {"data": {"source": "austn"}}},
        {"source": "teacher_samples", "prefixes": {"data": {"source": "austen", "heldot": "Emma"}}},
    ]
    with pytest.raises(RecipeError) as error:
        recipe_with_data({"mix": misspelt})
    problems = dict(error.value.problems)
    assert "did you mean 'austen'" in problems["data.mix.0.prefixes.data.source"]
    assert "did you mean 'heldout'" in problems["data.mix.1.prefixes.data.heldot"]
    with pytest.raises(RecipeError, match="cannot give prompt prefixes"):
        recipe_with_data({"source": "teacher_samples", "prefixes": {"data": {"source": "teacher_samples"}}})
