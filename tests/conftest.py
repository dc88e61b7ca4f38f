"""Shared fixtures: tiny random teachers built from configs and a CLI runner."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("matrix_orientation", "hidden_state_alignment", "knowledge_distillation")
# A recipe's teacher block: a 2-layer random Llama built from its config (GQA: 4 heads, 2 kv heads).
TINY_TEACHER = {
    "source": "config",
    "model_type": "llama",
    "config": {
        "vocab_size": 256,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": 1,
        "eos_token_id": 0,
        "pad_token_id": 0,
    },
}


def write_recipe(
    folder: Path, steps: int = 12, every_steps: int = 5, threads: int | None = None, every_tokens: int | None = 1024
) -> Path:
    """A 2-layer random Llama → discrete Mamba-2 recipe: three stages of ``steps`` steps of 4 × 64 tokens."""
    recipe = {
        "name": "resume-test",
        "seed": 0,
        "teacher": copy.deepcopy(TINY_TEACHER),
        "student": {"mixer": {"name": "discrete_mamba2", "chunk_size": 16}},
        "data": {"source": "text", "paths": [str(REPO / "README.md"), str(REPO / "docs" / "*.md")]},
        "stages": [
            {"name": name, "tokens": steps * 256, "batch_size": 4, "seq_len": 64, "optimizer": {"lr": 1e-3}}
            for name in STAGES
        ],
        "eval": {"tokens": 256, "seq_len": 64, "batch_size": 4, "every_tokens": every_tokens, "prompt": None},
        "output": {"checkpoint": {"every_steps": every_steps, "every_minutes": None}},
    }
    if threads:
        recipe["threads"] = threads
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def llama_teacher():
    return tiny_llama()


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 600):
    """Run ``python -m mixerdistill ARGS`` in a subprocess; returns the CompletedProcess."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mixerdistill", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def short_real_run(output: Path, recipe: str, kd_options: str = "", overrides: tuple[str, ...] = ()) -> dict:
    """A recipe of ``recipes/`` cut to three 512-token stages (batch 2 × 128) and a short evaluation, run
    through the CLI into ``output``; its report.json. ``kd_options`` is appended to stage 3's block and
    ``overrides`` are further ``--set`` values."""
    stage = "{name: %s, tokens: 512, batch_size: 2, seq_len: 128, optimizer: {lr: 1.0e-3}%s}"
    stages = ", ".join(
        [
            stage % ("matrix_orientation", ""),
            stage % ("hidden_state_alignment", ", distance: relative"),
            stage % ("knowledge_distillation", kd_options),
        ]
    )
    sets = [f"stages=[{stages}]", "eval.tokens=1024", "eval.seq_len=128", "eval.max_new_tokens=8", *overrides]
    options = [part for value in sets for part in ("--set", value)]
    result = run_cli("run", str(REPO / "recipes" / recipe), "--output", str(output), "--no-progress", *options)
    assert result.returncode == 0, result.stderr
    return json.loads((output / "report.json").read_text())


def cli_in_process(*args: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of the CLI run in this process (fast; no interpreter start-up)."""
    from mixerdistill.cli import main

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            main(list(args))
        except SystemExit as exit_:
            return exit_.code, out.getvalue()
    return 0, out.getvalue()


def make_distribution(root: Path, name: str, module_source: str, entry_point: str | None = None) -> None:
    """An installed-looking distribution (module + dist-info with an entry point) under ``root``."""
    module = name.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[mixerdistill]\n{entry_point or module} = {module}\n")
