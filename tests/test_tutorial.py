"""The plugin tutorials suffice alone: the file blocks of docs/writing_a_mixer.md and of
docs/writing_an_adapter.md, put together in an empty folder, are packages that pip installs and whose
tests (check_mixer, check_adapter among them) pass; examples/mixer_plugin and examples/adapter_plugin are
the same text.

Code blocks whose info string carries ``file=PATH`` are parts of that file, in order. After editing a
tutorial, rewrite both examples with ``python tests/test_tutorial.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

FILE_BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Tutorial:
    """One tutorial page, the example folder generated from it, and what its package registers."""

    page: Path
    example: Path
    files: frozenset[str]
    kind: str  # the registry the plugin fills ('mixers', 'teachers')
    registers: str  # the name it registers there
    plugin: tuple[str, str]  # (entry-point name, distribution)
    tests: int  # how many tests the package's own tests/ holds


TUTORIALS = {
    "mixer_plugin": Tutorial(
        REPO / "docs" / "writing_a_mixer.md",
        REPO / "examples" / "mixer_plugin",
        frozenset({"pyproject.toml", "mixerdistill_window/__init__.py", "tests/test_sliding_window.py", "recipe.yaml"}),
        "mixers",
        "sliding_window",
        ("window", "mixerdistill-window"),
        5,
    ),
    "adapter_plugin": Tutorial(
        REPO / "docs" / "writing_an_adapter.md",
        REPO / "examples" / "adapter_plugin",
        frozenset({"pyproject.toml", "mixerdistill_starcoder2/__init__.py", "tests/test_starcoder2.py", "recipe.yaml"}),
        "teachers",
        "starcoder2",
        ("starcoder2", "mixerdistill-starcoder2"),
        5,
    ),
}


def tutorial_files(text: str) -> dict[str, str]:
    """{relative path: content} from the tutorial's ``file=`` blocks, the blocks of one file concatenated."""
    files: dict[str, str] = {}
    for path, body in FILE_BLOCK.findall(text):
        files[path] = files.get(path, "") + body
    return files


def example_files(example: Path) -> dict[str, str]:
    """The example package's source files (build and cache folders left out)."""
    return {
        str(path.relative_to(example)): path.read_text()
        for path in sorted(example.rglob("*"))
        if path.is_file()
        and not any(
            part.endswith(".egg-info") or part in ("__pycache__", "build") for part in path.relative_to(example).parts
        )
    }


@pytest.mark.parametrize("folder", sorted(TUTORIALS))
def test_the_example_package_is_the_tutorial_text(folder):
    tutorial = TUTORIALS[folder]
    files = tutorial_files(tutorial.page.read_text())
    assert set(files) == tutorial.files
    assert files == example_files(tutorial.example), (
        f"examples/{folder} differs from docs/{tutorial.page.name}: run python tests/test_tutorial.py"
    )


@pytest.mark.slow  # pip and a fresh interpreter: ~15 s alone per tutorial, more on a busy 2-core machine
@pytest.mark.ci
@pytest.mark.parametrize("folder", sorted(TUTORIALS))
def test_the_tutorial_builds_installs_and_passes_its_tests(folder, tmp_path: Path):
    tutorial = TUTORIALS[folder]
    package, site = tmp_path / folder, tmp_path / "site"
    for relative, content in tutorial_files(tutorial.page.read_text()).items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(content)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(package),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    # The freshly built package, not the editable example copy of it, is the one mixerdistill loads.
    check = (
        "import json, sys, pytest; from mixerdistill.plugins import registry; "
        f"owner = registry({tutorial.kind!r}).owner({tutorial.registers!r}); "
        "print(json.dumps([owner.name, owner.distribution, owner.source])); "
        f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '{folder}/tests']))"
    )
    environment = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", check],
        check=False,
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    name, distribution, source = json.loads(result.stdout.splitlines()[0])
    assert (name, distribution) == tutorial.plugin
    assert Path(source).is_relative_to(site)
    assert f"{tutorial.tests} passed" in result.stdout


if __name__ == "__main__":
    for tutorial in TUTORIALS.values():
        for relative, content in tutorial_files(tutorial.page.read_text()).items():
            (tutorial.example / relative).parent.mkdir(parents=True, exist_ok=True)
            (tutorial.example / relative).write_text(content)
        print(f"wrote {tutorial.example} from {tutorial.page}")
