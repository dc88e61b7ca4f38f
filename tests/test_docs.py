"""Docs that cannot drift: the recipe reference is generated from the schema and the plugins."""

from conftest import REPO
from mixerdistill.reference import render_recipe_reference


def test_recipe_reference_is_current():
    written = (REPO / "docs" / "recipes.md").read_text()
    assert written == render_recipe_reference(), (
        "docs/recipes.md is stale: run `python -m mixerdistill.reference > docs/recipes.md`"
    )


def test_readme_gives_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_teacher_family_table_is_current():
    from mixerdistill.reference import TEACHER_TABLE_END, TEACHER_TABLE_START, render_teacher_table

    written = (REPO / "docs" / "teachers.md").read_text()
    start, end = written.index(TEACHER_TABLE_START), written.index(TEACHER_TABLE_END) + len(TEACHER_TABLE_END)
    assert written[start:end] == render_teacher_table(), (
        "docs/teachers.md's family table is stale: replace it with "
        "`python -c 'from mixerdistill.reference import render_teacher_table as r; print(r())'`"
    )
