"""Plugins cannot hijack names or fail quietly: collisions, built-in names, import failures, the allow-list,
one plugin set per run, and `mixerdistill plugins` as a plugin author reads it (piped, --details).

Third-party packages are throwaway distributions (a module and a dist-info folder) on sys.path, loaded by a
fresh in-process PluginManager: no network, no pip, no interpreter start-up.
"""

from __future__ import annotations

import importlib
import os
import warnings

import pytest

from conftest import cli_in_process, make_distribution, write_recipe
from mixerdistill import plugins
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.plugins import (
    ALLOW_LIST_VARIABLE,
    PLUGIN_SET_VARIABLE,
    PluginManager,
    PluginWarning,
)
from mixerdistill.recipe import load_recipe


def mixer_module(mixer: str, field: str, description: str) -> str:
    """A plugin module registering ``mixer``: discrete Mamba-2 with one extra Config field."""
    return f'''
    """A third-party mixer package."""
    from pydantic import Field

    from mixerdistill.hookspecs import hookimpl
    from mixerdistill_plugins.discrete_mamba2 import DiscreteMamba2


    class Twin(DiscreteMamba2):
        """Discrete Mamba-2 under another name."""

        class Config(DiscreteMamba2.Config):
            {field}: int = Field(1, ge=0, description="{description}")


    @hookimpl
    def register_mixers(register):
        register("{mixer}", Twin)
    '''


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path to 'install' distributions into; plugin environment variables unset."""
    for variable in (ALLOW_LIST_VARIABLE, PLUGIN_SET_VARIABLE):
        monkeypatch.setenv(variable, "")  # recorded, so that the undo also removes values set by the code
        monkeypatch.delenv(variable)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def install(site, name: str, source: str) -> None:
    make_distribution(site, name, source)
    importlib.invalidate_caches()


def loaded(monkeypatch=None) -> PluginManager:
    """A fresh manager over what is installed now; with ``monkeypatch``, also the process-wide one."""
    manager = PluginManager()
    manager.load_entry_points()
    if monkeypatch is not None:
        monkeypatch.setattr(plugins, "_manager", manager)
    return manager


@pytest.fixture
def twins(site, monkeypatch):
    """Two packages that both register the mixer 'twin', as the process-wide plugins."""
    install(site, "alpha-mixers", mixer_module("twin", "alpha_only", "a field only alpha's twin has"))
    install(site, "beta-mixers", mixer_module("twin", "beta_only", "a field only beta's twin has"))
    with pytest.warns(PluginWarning, match="mixer 'twin' is registered by 'alpha_mixers'.* and 'beta_mixers'"):
        return loaded(monkeypatch)


# -- 1. collisions -----------------------------------------------------------------------------------
def test_a_name_two_packages_register_is_an_error_naming_both(twins):
    assert {"alpha_mixers", "beta_mixers"} <= set(twins.plugins)  # neither plugin is skipped
    with pytest.raises(
        UserError,
        match=r"'twin' is registered by two plugins, 'alpha_mixers' \(alpha-mixers "
        r"1\.2\.3, .*alpha_mixers\.py\) and 'beta_mixers' \(beta-mixers",
    ):
        twins.registries["mixers"].get("twin")
    assert twins.registries["mixers"].get("beta-mixers:twin").Config.model_fields.keys() >= {"beta_only"}
    assert twins.registries["mixers"].get("alpha_mixers:twin").Config.model_fields.keys() >= {"alpha_only"}
    assert twins.snapshot()["conflicts"] == {"mixers": {"twin": ["alpha_mixers", "beta_mixers"]}}


def test_validate_and_run_refuse_the_ambiguous_name_and_accept_a_package(twins, tmp_path):
    recipe = write_recipe(tmp_path)
    ambiguous = ["student.mixer={name: twin}"]
    with pytest.raises(
        RecipeError,
        match=r"student\.mixer\.name: mixer 'twin' is registered by two plugins.*"
        r"'alpha-mixers:twin' or 'beta-mixers:twin'",
    ):
        load_recipe(recipe, ambiguous)
    chosen = load_recipe(recipe, ["student.mixer={name: 'beta-mixers:twin', beta_only: 3}"])
    assert chosen.student.mixer.config.beta_only == 3
    for command in (("validate", str(recipe)), ("run", str(recipe), "--output", str(tmp_path / "run"))):
        code, output = cli_in_process(*command, "--set", ambiguous[0])
        assert code == 2 and "alpha-mixers" in output and "beta-mixers" in output, output
    assert not (tmp_path / "run").exists()
    code, output = cli_in_process("plugins")
    assert code == 2 and "mixer 'twin' is registered by 'alpha_mixers'" in " ".join(output.split())


def test_the_allow_list_picks_one_of_two_packages(site, monkeypatch):
    install(site, "alpha-mixers", mixer_module("twin", "alpha_only", "alpha"))
    install(site, "beta-mixers", mixer_module("twin", "beta_only", "beta"))
    monkeypatch.setenv(ALLOW_LIST_VARIABLE, "beta_mixers")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        manager = loaded()
    assert "beta_only" in manager.registries["mixers"].get("twin").Config.model_fields


def test_a_builtin_name_cannot_be_taken_by_a_package(site):
    install(site, "hijack-mixers", mixer_module("discrete_mamba2", "extra", "a hijacked mixer"))
    with pytest.warns(
        PluginWarning,
        match=r"plugin 'hijack_mixers' \(hijack-mixers\) failed to register: "
        r".*hijack_mixers\.py:\d+: ValueError: mixer 'discrete_mamba2' belongs "
        r"to the built-in plugin",
    ):
        manager = loaded()
    assert manager.registries["mixers"].owner("discrete_mamba2").builtin
    assert "hijack_mixers" not in manager.plugins and not manager.registries["mixers"].conflicts()


# -- 3. failures, the allow-list and one plugin set per run --------------------------------------------
def test_a_failed_import_names_file_line_and_error_and_the_unknown_mixer_mentions_it(site):
    install(site, "broken-dep", '"""Needs a package that is not installed."""\n\nimport mixerdistill_absent_xyz\n')
    install(site, "broken-syntax", "def register_mixers(:\n")
    with pytest.warns(PluginWarning) as caught:
        manager = loaded()
    messages = " | ".join(str(w.message) for w in caught)
    assert f"{site / 'broken_dep.py'}:3: ModuleNotFoundError: No module named 'mixerdistill_absent_xyz'" in messages
    assert f"{site / 'broken_syntax.py'}:1: SyntaxError" in messages
    with pytest.raises(
        UserError,
        match=r"unknown mixer 'sliding_windo'(.|\n)*note: plugin 'broken_dep' "
        r"\(broken-dep\) failed to load: failed to import: .*broken_dep\.py:3",
    ):
        manager.registries["mixers"].get("sliding_windo")


def test_a_misspelt_allow_list_name_is_an_error(site, monkeypatch):
    install(site, "alpha-mixers", mixer_module("alpha_twin", "alpha_only", "alpha"))
    monkeypatch.setenv(ALLOW_LIST_VARIABLE, "alpha_mixer")
    with pytest.raises(
        UserError,
        match=r"MIXERDISTILL_PLUGINS: no installed plugin is named 'alpha_mixer' "
        r"\(did you mean 'alpha_mixers'\?\)",
    ):
        loaded()
    monkeypatch.setattr(plugins, "_manager", None)
    code, output = cli_in_process("plugins")
    assert code == 2 and "no installed plugin is named 'alpha_mixer'" in output


def test_a_mixer_left_out_by_the_allow_list_says_so(site, monkeypatch):
    install(site, "alpha-mixers", mixer_module("alpha_twin", "alpha_only", "alpha"))
    install(site, "beta-mixers", mixer_module("beta_twin", "beta_only", "beta"))
    monkeypatch.setenv(ALLOW_LIST_VARIABLE, "alpha_mixers")
    manager = loaded()
    with pytest.raises(
        UserError,
        match=r"unknown mixer 'beta_twin'(.|\n)*note: MIXERDISTILL_PLUGINS="
        r"'alpha_mixers' leaves out the installed plugin\(s\) 'beta_mixers'",
    ):
        manager.registries["mixers"].get("beta_twin")


def test_ranks_load_the_plugin_set_the_run_started_with(site, monkeypatch):
    """A plugin installed while a run goes on (here a broken one) is not read by the run's later processes."""
    install(site, "alpha-mixers", mixer_module("alpha_twin", "alpha_only", "alpha"))
    parent = loaded(monkeypatch)
    seen = {}
    monkeypatch.setattr("torch.distributed.run.run", lambda options: seen.update(os.environ))
    from mixerdistill.distributed.launcher import launch

    launch(2, ["run", "recipe.yaml"], resume_command=["mixerdistill", "run", "--resume"])
    third_party = {name for name, info in parent.plugins.items() if not info.builtin}
    assert "alpha_mixers" in third_party and set(seen[PLUGIN_SET_VARIABLE].split(",")) == third_party
    assert PLUGIN_SET_VARIABLE not in os.environ  # set for the ranks only, not left behind in this process
    monkeypatch.setenv(PLUGIN_SET_VARIABLE, seen[PLUGIN_SET_VARIABLE])  # what a rank process starts with
    install(site, "late-plugin", "raise ImportError('installed half-way through the run')\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        rank = loaded()
    assert set(rank.plugins) == set(parent.plugins)
    assert rank.registries["mixers"].names() == parent.registries["mixers"].names()


# -- 4. what `mixerdistill plugins` shows a plugin author ----------------------------------------------
def test_piped_listing_keeps_full_names_and_shows_package_and_source(site, monkeypatch):
    long_mixer = "a_mixer_with_a_rather_long_name_that_a_narrow_table_would_cut"
    install(site, "a-package-with-a-long-distribution-name", mixer_module(long_mixer, "extra", "x"))
    loaded(monkeypatch)
    code, output = cli_in_process("plugins")
    assert code == 0, output
    for text in (
        long_mixer,
        "a-package-with-a-long-distribution-name",
        "1.2.3",
        str(site / "a_package_with_a_long_distribution_name.py"),
    ):
        assert text in output


def test_details_show_a_third_party_config_as_the_reference_does(twins):
    code, output = cli_in_process("plugins", "--details", "beta-mixers:twin")
    assert code == 0, output
    [row] = [line for line in output.splitlines() if "beta_only" in line]
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [
        "beta_only",
        "int",
        "`1`",
        "a field only beta's twin has",
    ]
    assert "chunk_size" in output and "Discrete Mamba-2 under another name." in output
    code, output = cli_in_process("plugins", "--details", "twin")
    assert code == 2 and "registered by two plugins" in output
