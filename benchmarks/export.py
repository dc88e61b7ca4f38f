"""Export of a run's student, and decode speed of the exported model next to mixerdistill's own decoding.

    .venv/bin/python benchmarks/export.py RUN [--stage N] [--prompt TEXT] [--new-tokens 64] [--repeats 3]

Prints: export seconds, folder size, load seconds of the exported folder, then greedy decode tokens/s of
(a) ``mixerdistill generate``'s loop (``stream_tokens``) on the checkpoint's student and (b) transformers'
``generate()`` on the exported folder (``trust_remote_code=True``), same prompt, same machine, and their
ratio, and whether their greedy tokens agree. Decode rate = (new tokens − 1) / (time from the first new token to
the last), timed inside one generation (``stream_tokens`` yields each token; ``generate()`` reports each to a
streamer), so the prompt and a second, separately timed run do not enter it; the best of ``--repeats`` runs,
the two models alternating. ``--threads`` sets torch's intra-op threads for both (default: torch's own).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


class TokenClock:
    """A ``generate()`` streamer that only notes when each new token arrives (its first ``put`` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def decode_rate(times: list[float]) -> float:
    """Tokens/s after the first token: (n − 1) / (t_n − t_1), from each new token's arrival time."""
    return (len(times) - 1) / max(times[-1] - times[0], 1e-9)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stage", type=int, default=None)
    parser.add_argument("--prompt", default="It is a truth universally acknowledged, that")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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

        def own() -> tuple[list[float], list[int]]:
            times, tokens = [], []
            for token in stream_tokens(student, prompt, args.new_tokens):
                times.append(time.perf_counter())
                tokens.append(int(token[0]))
            return times, tokens

        def hf() -> tuple[list[float], list[int]]:
            clock = TokenClock()
            exported.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                streamer=clock,
            )
            return clock.times, clock.tokens

        rates = {own: [], hf: []}
        tokens = {}
        for _ in range(args.repeats):  # alternated, so a change in the machine's load hits both alike
            for generate_once, found in rates.items():
                times, tokens[generate_once] = generate_once()
                found.append(decode_rate(times))
        own_rate, hf_rate = max(rates[own]), max(rates[hf])
    print(f"decode, {args.new_tokens} new tokens after a {prompt.shape[1]}-token prompt, best of {args.repeats}:")
    print(f"  mixerdistill (stream_tokens): {own_rate:.1f} tokens/s")
    print(f"  exported (transformers generate): {hf_rate:.1f} tokens/s ({hf_rate / own_rate:.1%} of mixerdistill)")
    print(
        f"  same greedy tokens: {tokens[own] == tokens[hf]} ({len(tokens[own])} and {len(tokens[hf])}); "
        f"threads: {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
