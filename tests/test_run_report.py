"""RunReport reads a report.json written before it existed and writes it back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from mixerdistill.report import render_report, summarise_run, write_report
from mixerdistill.run_report import RunReport

OLD_REPORT = Path(__file__).parent / "data" / "report_9bc8737.json"  # recipes/tiny.yaml, written by commit 9bc8737


def test_an_old_report_round_trips_with_its_keys(tmp_path):
    written = json.loads(OLD_REPORT.read_text())
    report = RunReport.model_validate(written)
    assert report.to_json() == written and list(report.to_json()) == list(written)
    assert report.stages[0].name == "matrix_orientation" and report.curve[-1].tokens == 65536
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == written
    assert "| teacher | 253.85 | 1.00 |" in (tmp_path / "report.md").read_text()
    summary = summarise_run(tmp_path)
    assert summary["training_tokens"] == 65536 and summary["student_perplexity"] == written["student"]["perplexity"]


def test_keys_not_known_yet_are_left_out():
    written = json.loads(OLD_REPORT.read_text())
    partial = {key: written[key] for key in ("recipe", "teacher", "student", "data")}
    report = RunReport.model_validate(partial)
    assert list(report.to_json()) == ["recipe", "teacher", "student", "data", "stages", "curve"]
    assert "Total wall time" not in render_report(report)
