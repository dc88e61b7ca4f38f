"""Shared fixtures: tiny random teachers built from configs and a CLI runner."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def llama_teacher():
    return tiny_llama()


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 600):
    """Run ``python -m mixerdistill ARGS`` in a subprocess; returns the CompletedProcess."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mixerdistill", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


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
