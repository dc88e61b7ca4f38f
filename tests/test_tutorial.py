"""docs/writing_a_mixer.md suffices alone: its file blocks, put together in an empty folder, are a package
that pip installs and whose tests (check_mixer among them) pass; examples/mixer_plugin is the same text.

Code blocks whose info string carries ``file=PATH`` are parts of that file, in order. After editing the
tutorial, rewrite the example with ``python tests/test_tutorial.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TUTORIAL = REPO / "docs" / "writing_a_mixer.md"
EXAMPLE = REPO / "examples" / "mixer_plugin"
FILE_BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def tutorial_files(text: str) -> dict[str, str]:
    """{relative path: content} from the tutorial's ``file=`` blocks, the blocks of one file concatenated."""
    files: dict[str, str] = {}
    for path, body in FILE_BLOCK.findall(text):
        files[path] = files.get(path, "") + body
    return files


def example_files() -> dict[str, str]:
    """The example package's source files (build and cache folders left out)."""
    return {
        str(path.relative_to(EXAMPLE)): path.read_text()
        for path in sorted(EXAMPLE.rglob("*"))
        if path.is_file()
        and not any(
            part.endswith(".egg-info") or part in ("__pycache__", "build") for part in path.relative_to(EXAMPLE).parts
        )
    }


def test_the_example_package_is_the_tutorial_text():
    files = tutorial_files(TUTORIAL.read_text())
    assert set(files) == {
        "pyproject.toml",
        "mixerdistill_window/__init__.py",
        "tests/test_sliding_window.py",
        "recipe.yaml",
    }
    assert files == example_files(), (
        "examples/mixer_plugin differs from the tutorial: run python tests/test_tutorial.py"
    )


@pytest.mark.slow  # pip and a fresh interpreter: ~15 s alone, more on a busy 2-core machine
@pytest.mark.ci
def test_the_tutorial_builds_installs_and_passes_its_tests(tmp_path: Path):
    package, site = tmp_path / "mixer_plugin", tmp_path / "site"
    for relative, content in tutorial_files(TUTORIAL.read_text()).items():
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
        "owner = registry('mixers').owner('sliding_window'); "
        "print(json.dumps([owner.name, owner.distribution, owner.source])); "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'mixer_plugin/tests']))"
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
    assert (name, distribution) == ("window", "mixerdistill-window")
    assert Path(source).is_relative_to(site)
    assert "5 passed" in result.stdout


if __name__ == "__main__":
    for relative, content in tutorial_files(TUTORIAL.read_text()).items():
        (EXAMPLE / relative).parent.mkdir(parents=True, exist_ok=True)
        (EXAMPLE / relative).write_text(content)
    print(f"wrote {EXAMPLE} from {TUTORIAL}")
