"""Docs that cannot drift: the recipe reference is generated from the schema and the plugins."""

from conftest import REPO
from mixerdistill.reference import render_recipe_reference


def test_recipe_reference_is_current():
    written = (REPO / "docs" / "recipes.md").read_text()
    assert written == render_recipe_reference(), (
        "docs/recipes.md is stale: run `python -m mixerdistill.reference > docs/recipes.md`")


def test_readme_gives_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
