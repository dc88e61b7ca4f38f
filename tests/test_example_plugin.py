"""The plugin tutorials' packages (examples/mixer_plugin, examples/adapter_plugin) are installed, discovered
and usable in a run.

`make setup` installs them; these tests keep docs/writing_a_mixer.md and docs/writing_an_adapter.md from rotting.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest

from conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "mixer_plugin"
ADAPTER_EXAMPLE = REPO / "examples" / "adapter_plugin"


@pytest.fixture(scope="module", autouse=True)
def installed():
    for distribution, folder in (("mixerdistill-window", EXAMPLE), ("mixerdistill-starcoder2", ADAPTER_EXAMPLE)):
        try:
            importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(
                f"the tutorial package {distribution} is not installed: run `make setup` "
                f"(or `pip install -e examples/{folder.name}`)"
            )


def test_listed_as_a_third_party_plugin():
    listing = json.loads(run_cli("plugins", "--json").stdout)
    [plugin] = [p for p in listing["plugins"] if p["name"] == "window"]
    assert plugin["distribution"] == "mixerdistill-window" and not plugin["builtin"]
    assert plugin["registers"] == {"mixers": ["sliding_window"]}


def test_the_adapter_is_listed_as_a_third_party_plugin():
    listing = json.loads(run_cli("plugins", "--json").stdout)
    [plugin] = [p for p in listing["plugins"] if p["name"] == "starcoder2"]
    assert plugin["distribution"] == "mixerdistill-starcoder2" and not plugin["builtin"]
    assert plugin["registers"] == {"teachers": ["starcoder2"]}


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


@pytest.mark.slow  # ~10 s alone; CI runs slow tests too
def test_a_recipe_runs_with_the_tutorial_adapter(tmp_path: Path):
    result = run_cli("run", str(ADAPTER_EXAMPLE / "recipe.yaml"), "--output", str(tmp_path / "run"), "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # The teacher's model_type found the plugin's adapter; the transfer check passed on every layer.
    assert report["teacher"]["adapter"] == "starcoder2"
    assert report["student"]["mixers"] == {"discrete_mamba2": 2}
    assert [s["name"] for s in report["stages"]] == ["matrix_orientation", "hidden_state_alignment"]
    assert all(math.isfinite(s["loss_first"]) and math.isfinite(s["loss_last"]) for s in report["stages"])
