"""The built wheel is complete: installed in a fresh virtual environment (no source tree on the path),
its CLI lists the built-in plugins and every command group imports, `mixerdistill bench` included."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {
    "attention",
    "discrete_mamba2",
    "linear_attention",
    "toeplitz",
    "semiseparable",
    "mamba2",
    "composite",
    "delta_net",
    "mlstm",
    "families",
    "stages",
    "datasets",
}


def run(*command, cwd: Path) -> str:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
@pytest.mark.ci
def test_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--quiet",
        "--wheel-dir",
        tmp_path / "dist",
        ROOT,
        cwd=tmp_path,
    )
    wheel = next((tmp_path / "dist").glob("mixerdistill-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel, cwd=tmp_path)
    # The dependencies (torch, transformers, …) come from this environment, read-only: a .pth line puts
    # its site-packages after the fresh one, so mixerdistill itself is the wheel's copy.
    fresh_site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    located = run(
        python,
        "-c",
        "import mixerdistill, mixerdistill.bench, mixerdistill_plugins; "
        "print(mixerdistill.__file__, mixerdistill.bench.__file__, mixerdistill_plugins.__file__)",
        cwd=tmp_path,
    )
    assert all(line.startswith(str(fresh_site)) for line in located.split()), located
    listed = json.loads(run(venv / "bin" / "mixerdistill", "plugins", "--json", cwd=tmp_path))
    assert BUILT_IN <= {plugin["name"] for plugin in listed["plugins"] if plugin["builtin"]}, listed["plugins"]
    assert {"discrete_mamba2", "attention"} <= set(listed["mixers"])
    assert "--write" in run(venv / "bin" / "mixerdistill", "bench", "--help", cwd=tmp_path)
    # The recipes ship in the wheel: found by name from any folder, the benchmarks' one included.
    assert "ok smollm2_mamba" in run(venv / "bin" / "mixerdistill", "validate", "smollm2_mamba", cwd=tmp_path)
    recipe = run(python, "-c", "from mixerdistill.bench import SMOLLM2_RECIPE; print(SMOLLM2_RECIPE)", cwd=tmp_path)
    assert recipe.startswith(str(fresh_site)) and recipe.strip().endswith("smollm2_mamba.yaml"), recipe


def test_public_api_is_importable_from_the_package():
    import mixerdistill
    from mixerdistill import mixer, stages

    assert mixerdistill.hookimpl is mixerdistill.hookspecs.hookimpl
    assert mixerdistill.SequenceMixer is mixer.SequenceMixer and mixerdistill.Stage is stages.Stage
    for name in mixerdistill.__all__:
        assert getattr(mixerdistill, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Mixer'"):
        getattr(mixerdistill, "Mixer")  # noqa: B009
