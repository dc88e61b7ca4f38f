"""``mixerdistill generate``: stream a continuation from a run's student (or its teacher)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from mixerdistill.cli import app
from mixerdistill.console import stderr_console


@app.command("generate")
def generate_command(
    run: Path = typer.Argument(
        ..., metavar="RUN_DIR_OR_CHECKPOINT", help="A run directory or a stage checkpoint folder."
    ),
    prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above 0: sampling."),
    top_p: float = typer.Option(
        1.0, "--top-p", min=0.0, max=1.0, help="Sample only from the most likely tokens holding this much probability."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the sampler (sampling is then reproducible)."),
    stage: int = typer.Option(
        None, "--stage", min=1, help="Stage checkpoint of the run (default: the last finished one)."
    ),
    teacher: bool = typer.Option(False, "--teacher", help="Generate with the run's teacher, for comparison."),
    device: str = typer.Option("auto", "--device", help="'auto', 'cpu', 'cuda', 'cuda:1', …"),
):
    """Continue --prompt with the student, printing the text as the tokens come; tokens/s go to stderr.

    The student decodes with one constant-size recurrent state per mixer layer.
    """
    import torch

    from mixerdistill.checkpoint import load_student
    from mixerdistill.device import pick_device
    from mixerdistill.errors import UserError
    from mixerdistill.generation import Sampling, TextStream, stream_tokens
    from mixerdistill.harness import find_checkpoint, load_teacher_of, load_tokenizer

    if not prompt.strip():
        raise UserError("--prompt is empty: give the text to continue")
    if top_p == 0:
        raise UserError("--top-p must be above 0")
    checkpoint = find_checkpoint(run, stage)
    tokenizer = load_tokenizer(checkpoint)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    torch_device = pick_device(device)
    model = load_teacher_of(checkpoint) if teacher else load_student(checkpoint)[0]
    model.to(torch_device)
    who = "teacher of" if teacher else "student from"
    stderr_console.print(f"[bold]generate[/]: {who} {checkpoint}", soft_wrap=True)

    text = TextStream(tokenizer, context=prompt_ids)
    tokens = stream_tokens(
        model,
        torch.tensor([prompt_ids], device=torch_device),
        max_new_tokens,
        Sampling(temperature, top_p, seed),
        eos_token_id=tokenizer.eos_token_id,
    )
    start = time.perf_counter()
    count, first_token_at = 0, start
    for token in tokens:
        count += 1
        if count == 1:
            first_token_at = time.perf_counter()
        print(text.push(token.item()), end="", flush=True)
    print(text.flush(), flush=True)
    end = time.perf_counter()
    decode = f", then {(count - 1) / (end - first_token_at):.1f} tokens/s" if count > 1 else ""
    stderr_console.print(
        f"{count} tokens in {end - start:.2f} s: {count / (end - start):.1f} tokens/s "
        f"(prompt of {len(prompt_ids)} tokens and first token {first_token_at - start:.2f} s"
        f"{decode})",
        highlight=False,
        soft_wrap=True,
    )
