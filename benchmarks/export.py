"""Export of a run's student, and decode speed of the exported model next to mixerdistill's own decoding.

    .venv/bin/python benchmarks/export.py RUN [--stage N] [--prompt TEXT] [--new-tokens 64] [--repeats 3]

Prints: export seconds, folder size, load seconds of the exported folder, then greedy decode tokens/s of
(a) ``mixerdistill generate``'s loop (``stream_tokens``) on the checkpoint's student and (b) transformers'
``generate()`` on the exported folder (``trust_remote_code=True``), same prompt, same machine, and their
ratio. Decode rate = (new tokens − 1) / (time after the first token); the best of ``--repeats`` runs, the two
models alternating.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def decode_rate(generate_once, new_tokens: int) -> float:
    """Tokens/s after the first token: (n − 1) / (t(n) − t(1))."""
    started = time.perf_counter()
    generate_once(1)
    first = time.perf_counter() - started
    started = time.perf_counter()
    generate_once(new_tokens)
    return (new_tokens - 1) / max(time.perf_counter() - started - first, 1e-9)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stage", type=int, default=None)
    parser.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from mixerdistill.checkpoint import load_student
    from mixerdistill.export import export_student
    from mixerdistill.generation import stream_tokens
    from mixerdistill.harness import find_checkpoint, load_tokenizer

    checkpoint = find_checkpoint(args.run, args.stage)
    tokenizer = load_tokenizer(checkpoint)
    prompt = torch.tensor([tokenizer.encode(args.prompt, add_special_tokens=False)])
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = export_student(args.run, Path(scratch) / "export", stage=args.stage)
        print(f"export: {time.perf_counter() - started:.1f} s, {result.bytes / 1e6:.1f} MB, {len(result.files)} files")
        started = time.perf_counter()
        exported = AutoModelForCausalLM.from_pretrained(result.folder, trust_remote_code=True).eval()
        print(f"load of the exported folder: {time.perf_counter() - started:.1f} s")
        student, _ = load_student(checkpoint)

        def own(count: int) -> None:
            for _ in stream_tokens(student, prompt, count):
                pass

        def hf(count: int) -> None:
            exported.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count, do_sample=False, eos_token_id=None
            )

        rates = {own: [], hf: []}
        for _ in range(args.repeats):  # alternated, so a change in the machine's load hits both alike
            for generate_once, found in rates.items():
                found.append(decode_rate(generate_once, args.new_tokens))
        own_rate, hf_rate = max(rates[own]), max(rates[hf])
    print(f"decode, {args.new_tokens} new tokens after a {prompt.shape[1]}-token prompt, best of {args.repeats}:")
    print(f"  mixerdistill (stream_tokens): {own_rate:.1f} tokens/s")
    print(f"  exported (transformers generate): {hf_rate:.1f} tokens/s ({hf_rate / own_rate:.1%} of mixerdistill)")


if __name__ == "__main__":
    main()
