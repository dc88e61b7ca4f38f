"""The plugin system: built-ins through entry points, third-party discovery, allow-list, broken plugins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, make_distribution, run_cli
from mixerdistill.errors import UserError
from mixerdistill.plugins import PluginInfo, PluginManager, PluginWarning, Registry

THIRD_PARTY_MODULE = '''
from mixerdistill.hookspecs import hookimpl
from mixerdistill_plugins.discrete_mamba2 import DiscreteMamba2


class EchoMamba(DiscreteMamba2):
    """A third-party mixer: discrete Mamba-2 under another name."""


@hookimpl
def register_mixers(register):
    register("echo_mamba", EchoMamba)
'''


def test_builtins_listed_as_json():
    result = run_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert {"attention", "discrete_mamba2"} <= set(listing["mixers"])
    assert {"llama", "phi"} <= set(listing["teachers"])
    assert {"matrix_orientation", "hidden_state_alignment", "knowledge_distillation"} <= set(listing["stages"])
    builtins = {p["name"]: p for p in listing["plugins"] if p["builtin"]}
    assert builtins["discrete_mamba2"]["registers"] == {"mixers": ["discrete_mamba2"]}
    assert builtins["families"]["version"] == "0.1.0"
    assert {"llama", "qwen3", "gemma3", "gpt2"} <= set(builtins["families"]["registers"]["teachers"])


def test_third_party_plugin_is_discovered_restricted_and_usable(tmp_path: Path):
    make_distribution(tmp_path, "echo-plugin", THIRD_PARTY_MODULE)
    env = {"PYTHONPATH": str(tmp_path)}
    listing = json.loads(run_cli("plugins", "--json", env=env).stdout)
    [plugin] = [p for p in listing["plugins"] if p["name"] == "echo_plugin"]
    assert plugin == {
        "name": "echo_plugin",
        "distribution": "echo-plugin",
        "version": "1.2.3",
        "builtin": False,
        "source": str(tmp_path / "echo_plugin.py"),
        "registers": {"mixers": ["echo_mamba"]},
    }
    # The allow-list keeps third-party plugins out, never the built-ins.
    restricted = json.loads(run_cli("plugins", "--json", env={**env, "MIXERDISTILL_PLUGINS": ""}).stdout)
    assert "echo_mamba" not in restricted["mixers"] and "discrete_mamba2" in restricted["mixers"]
    allowed = json.loads(run_cli("plugins", "--json", env={**env, "MIXERDISTILL_PLUGINS": "echo_plugin"}).stdout)
    assert "echo_mamba" in allowed["mixers"]
    # A recipe can use the plugin's mixer.
    result = run_cli(
        "run",
        str(REPO / "recipes" / "tiny.yaml"),
        "--output",
        str(tmp_path / "run"),
        "--set",
        "student.mixer.name=echo_mamba",
        "--set",
        "teacher.config.num_hidden_layers=1",
        "--set",
        "stages=[{name: matrix_orientation, tokens: 512, batch_size: 2, seq_len: 64}]",
        "--set",
        "eval.tokens=256",
        "--set",
        "eval.seq_len=64",
        "--set",
        "eval.prompt=null",
        "--no-progress",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["student"]["mixers"] == {"echo_mamba": 1}


def test_broken_plugin_warns_and_core_goes_on(tmp_path: Path):
    make_distribution(tmp_path, "broken-plugin", "raise ImportError('missing dependency xyz')\n")
    result = run_cli("plugins", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0
    assert "broken_plugin" in result.stderr and "missing dependency xyz" in result.stderr
    assert "discrete_mamba2" in json.loads(result.stdout)["mixers"]


class _Duplicate:
    from mixerdistill.hookspecs import hookimpl

    @staticmethod
    @hookimpl
    def register_mixers(register):
        register("discrete_mamba2", object)


class _Stage:
    from mixerdistill.hookspecs import hookimpl

    @staticmethod
    @hookimpl
    def register_stages(register):
        register("my_stage", object)


def test_a_builtin_name_cannot_be_taken_over():
    manager = PluginManager()
    manager.load_entry_points()
    with pytest.warns(PluginWarning, match="belongs to the built-in plugin 'discrete_mamba2'; plugin 'dupe'"):
        manager.register(_Duplicate(), "dupe")
    assert "dupe" not in manager.plugins
    assert manager.registries["mixers"].owner("discrete_mamba2").name == "discrete_mamba2"


def test_plugin_registered_at_run_time_and_unregistered():
    manager = PluginManager()
    info = manager.register(_Stage(), "runtime")
    assert info.registers == {"stages": ["my_stage"]}
    assert manager.registries["stages"].get("my_stage") is object
    manager.unregister("runtime")
    assert "my_stage" not in manager.registries["stages"]


def test_unknown_name_suggests():
    registry = Registry("mixers")
    registry.add("discrete_mamba2", object, owner=PluginInfo("x", "x-package", "1", builtin=False))
    with pytest.raises(UserError, match=r"did you mean 'discrete_mamba2'\?\); available: discrete_mamba2"):
        registry.get("discrete_mamba")
