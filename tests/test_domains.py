"""Unseen-domain evaluation: built-in domains, the leak check, and the report's domain table."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import REPO, STAGES, run_cli
from mixerdistill.data import ByteTokenizer, TokenData
from mixerdistill.domains import (
    Domain,
    check_no_leak,
    domain_table,
    pydoc_documents,
    reflow,
)
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.plugins import get_dataset
from mixerdistill.recipe import load_recipe, validate_recipe
from mixerdistill.report import comparison_table, render_report, summarise_run
from mixerdistill.run import execute
from mixerdistill.run_report import RunReport


def text_data(*paths, heldout=()) -> TokenData:
    source_cls = get_dataset("text")
    config = source_cls.Config.model_validate(
        {"paths": [str(p) for p in paths], "heldout_paths": [str(p) for p in heldout]}
    )
    return TokenData(source_cls(config), ByteTokenizer())


def domain_of(text: str, name: str = "probe") -> Domain:
    return Domain(name, windows=None, text=text)


def test_a_leaking_evaluation_document_is_refused(tmp_path):
    novel = (REPO / "README.md").read_text()
    (tmp_path / "train.txt").write_text(novel)
    (tmp_path / "held.txt").write_text((REPO / "docs" / "recipes.md").read_text())
    data = text_data(tmp_path / "train.txt", tmp_path / "held.txt", heldout=[tmp_path / "held.txt"])
    check_no_leak([domain_of((tmp_path / "held.txt").read_text())], data, ByteTokenizer())  # held out: fine
    reflowed = reflow(novel[5000:9000])  # another format of trained text still counts as a leak
    with pytest.raises(UserError, match="domain 'probe' appears in the training stream of data source 'data'"):
        check_no_leak([domain_of(reflowed)], data, ByteTokenizer())


def test_reflow_joins_lines_within_paragraphs():
    assert reflow("one\ntwo\n\n\nthree\n  four\n") == "one two\n\nthree four"
    assert len(pydoc_documents()) > 50 and "assert" in "".join(pydoc_documents()[:5])


def test_domain_table_and_geometric_mean():
    table, geomean = domain_table({"a": 10.0, "b": 20.0}, {"a": 20.0, "b": 160.0})
    assert table["a"] == {"teacher": 10.0, "student": 20.0, "ratio": 2.0}
    assert math.isclose(geomean, 4.0)


def test_domain_names_are_checked():
    with pytest.raises(RecipeError, match="unknown built-in domain 'pydc' \\(did you mean 'pydoc'"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["eval.domains=[pydc]"])
    with pytest.raises(RecipeError, match="domain named twice: pydoc"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["eval.domains=[pydoc, pydoc]"])


def tiny_mix_recipe(tmp_path, domains: list) -> dict:
    (tmp_path / "held.txt").write_text((REPO / "docs" / "evaluation.md").read_text())
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["teacher"]["config"].update(num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    recipe["data"] = {
        "mix": [
            {
                "source": "text",
                "paths": [str(REPO / "README.md"), str(tmp_path / "held.txt")],
                "heldout_paths": [str(tmp_path / "held.txt")],
                "weight": 3,
            },
            {
                "source": "teacher_samples",
                "samples": 24,
                "batch_size": 8,
                "max_new_tokens": 48,
                "heldout_fraction": 0.25,
                "max_repeated_ngrams": 1.0,
                "weight": 1,
            },
        ]
    }
    recipe["stages"] = [
        {"name": name, "tokens": 2 * 4 * 64, "batch_size": 4, "seq_len": 64, "optimizer": {"lr": 1e-3}}
        for name in STAGES
    ]
    recipe["eval"] = {
        "tokens": 256,
        "seq_len": 64,
        "batch_size": 4,
        "prompt": None,
        "domains": domains,
        "domain_tokens": 128,
    }
    return recipe


@pytest.mark.slow  # a whole run with teacher sampling: ~25 s on an idle 2-core machine
def test_a_mixture_run_reports_every_domain(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "notes.txt").write_text("Notes that nobody trains on. " * 40)
    domains = [
        "heldout",
        "heldout_reflowed",
        "pydoc",
        "teacher_samples",
        {"name": "notes", "path": str(tmp_path / "notes.txt")},
    ]
    recipe = validate_recipe(tiny_mix_recipe(tmp_path, domains))
    report = execute(recipe, tmp_path / "run", show_progress=False).to_json()
    names = ["heldout", "heldout_reflowed", "pydoc", "teacher_samples", "notes"]
    assert list(report["student"]["domains"]) == names
    for row in report["student"]["domains"].values():
        assert row["teacher"] > 1 and row["student"] > 1 and row["ratio"] == row["student"] / row["teacher"]
    ratios = [row["ratio"] for row in report["student"]["domains"].values()]
    assert math.isclose(report["student"]["domain_ratio_geomean"], math.prod(ratios) ** (1 / len(ratios)))
    assert [list(stage["domains_after"]) for stage in report["stages"]] == [names] * 3
    mix = report["data"]["mix"]
    assert [m["source"] for m in mix] == ["text", "teacher_samples"]
    assert sum(m["drawn_tokens"] for m in mix) == sum(s["tokens"] for s in report["stages"])
    written = json.loads((tmp_path / "run" / "report.json").read_text())
    assert RunReport.read(tmp_path / "run").data.mix == mix  # a mixture's report reads back (compare, eval)
    assert written["student"]["domain_ratio_geomean"] == report["student"]["domain_ratio_geomean"]
    assert "| pydoc |" in (tmp_path / "run" / "report.md").read_text()
    evaluated = run_cli(
        "eval", str(tmp_path / "run"), "--domains", "pydoc,notes", env={"MIXERDISTILL_CACHE": str(tmp_path / "cache")}
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "geometric mean" in evaluated.stdout
    scores = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(scores["domains"]) == ["pydoc", "notes"]
    assert scores["domains"]["pydoc"]["student"] == pytest.approx(report["student"]["domains"]["pydoc"]["student"])


def test_report_and_compare_show_the_domain_table(tmp_path):
    table, geomean = domain_table({"pydoc": 10.0, "heldout": 40.0}, {"pydoc": 30.0, "heldout": 60.0})
    report = {
        "recipe": "r",
        "teacher": {
            "source": "config",
            "adapter": "llama",
            "parameters": 10,
            "perplexity": 40.0,
            "domains": {"pydoc": 10.0, "heldout": 40.0},
        },
        "student": {
            "mixers": {"discrete_mamba2": 2},
            "parameters": 10,
            "perplexity": 60.0,
            "domains": table,
            "domain_ratio_geomean": geomean,
        },
        "data": {"train_tokens": 100, "heldout_tokens": 10, "eval_tokens": 8},
        "stages": [],
        "curve": [{"stage_index": 1, "tokens": 8, "perplexity": 61.0, "domains": {"pydoc": 31.0, "heldout": 61.0}}],
    }
    markdown = render_report(RunReport.model_validate(report))
    assert "| pydoc | 10.00 | 30.00 | 3.00 |" in markdown and f"**{geomean:.2f}**" in markdown
    assert "| training tokens | stage | perplexity | pydoc | heldout |" in markdown
    (tmp_path / "report.json").write_text(json.dumps(report))
    labels, rows = comparison_table([summarise_run(tmp_path)])
    assert dict(rows)["× teacher: pydoc"] == [3.0]
    assert dict(rows)["× teacher: geometric mean"] == [pytest.approx(math.sqrt(3 * 1.5))]


def test_a_run_whose_training_text_holds_an_evaluation_document_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "cache"))
    raw = tiny_mix_recipe(tmp_path, [{"name": "readme", "path": str(REPO / "README.md")}])
    raw["data"] = {"mix": raw["data"]["mix"][:1]}  # a mixture of one source: no sampling, a quick refusal
    recipe = validate_recipe(raw)
    with pytest.raises(UserError, match="domain 'readme' appears in the training stream of data source 'text'"):
        execute(recipe, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
