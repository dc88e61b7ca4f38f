"""``mixerdistill export``: a run's student as a self-contained Hugging Face model folder."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from mixerdistill.cli import app
from mixerdistill.console import stderr_console, stdout_console


@app.command("export")
def export_command(
    run: Path = typer.Argument(
        ..., metavar="RUN_DIR_OR_CHECKPOINT", help="A run directory or a stage checkpoint folder."
    ),
    to: Path = typer.Option(..., "--to", help="Folder to write (must be empty or absent, unless --overwrite)."),
    stage: int = typer.Option(
        None, "--stage", min=1, help="Stage checkpoint of the run (default: the last finished one)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Weights' dtype: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what is in --to."),
    max_shard_size: str = typer.Option(
        "2GB", "--max-shard-size", help="Weights above this size are split into shards (e.g. 500MB)."
    ),
    push_to_hub: str = typer.Option(
        None,
        "--push-to-hub",
        metavar="REPO",
        help="Also upload the folder to this Hugging Face hub repository "
        "(needs the 'hub' extra, network access and a token).",
    ),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repository private."),
):
    """Write the student as a transformers model: load it with
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); only torch and transformers needed."""
    from mixerdistill.export import export_student
    from mixerdistill.export import push_to_hub as push

    started = time.perf_counter()
    result = export_student(run, to, stage=stage, dtype=dtype, overwrite=overwrite, max_shard_size=max_shard_size)
    stderr_console.print(
        f"[bold]export[/]: {result.checkpoint} → {result.folder}: {len(result.files)} files, "
        f"{result.bytes / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s",
        highlight=False,
        soft_wrap=True,
    )
    if push_to_hub:
        stderr_console.print(f"[bold]export[/]: uploaded to hub repository {push(result.folder, push_to_hub, private)}")
    stdout_console.print(str(result.folder), highlight=False, soft_wrap=True)
