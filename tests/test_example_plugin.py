"""The plugin tutorial's package (examples/mixer_plugin) is installed, discovered and usable in a run.

`make setup` installs it; these tests keep docs/writing_a_mixer.md from rotting.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest

from conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "mixer_plugin"


@pytest.fixture(scope="module", autouse=True)
def installed():
    try:
        importlib.metadata.distribution("mixerdistill-window")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "the tutorial package is not installed: run `make setup` (or `pip install -e examples/mixer_plugin`)"
        )


def test_listed_as_a_third_party_plugin():
    listing = json.loads(run_cli("plugins", "--json").stdout)
    [plugin] = [p for p in listing["plugins"] if p["name"] == "window"]
    assert plugin["distribution"] == "mixerdistill-window" and not plugin["builtin"]
    assert plugin["registers"] == {"mixers": ["sliding_window"]}


@pytest.mark.slow  # ~10 s alone, ~20 s on a busy 2-core machine; CI runs slow tests too
def test_a_recipe_runs_with_the_tutorial_mixer(tmp_path: Path):
    result = run_cli("run", str(EXAMPLE / "recipe.yaml"), "--output", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["student"]["mixers"] == {"sliding_window": 2}
    # The stages ran on the tutorial mixer's matrices and outputs. Whether a loss falls in four steps of a
    # window-16 mixer on a random teacher depends on the text (the repository's own docs), so it is not asserted.
    assert [(s["name"], s["tokens"]) for s in report["stages"]] == [
        ("matrix_orientation", 1024),
        ("hidden_state_alignment", 1024),
    ]
    assert all(math.isfinite(s["loss_first"]) and math.isfinite(s["loss_last"]) for s in report["stages"])
    assert report["samples"]["student"]  # generate() ran through the mixer's recurrent state
