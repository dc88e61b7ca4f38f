"""Teacher-sampled training text: the teacher's own distribution as a data source (sequence-level KD).

``generate_samples`` draws continuations of prompts from the teacher in batches, with its KV cache,
temperature and nucleus (top-p) sampling. Batch ``b`` is seeded with ``seed`` and ``b`` alone, so a
batch is the same whether it is made in one go, after an interruption, or for a larger ``samples``.
Each finished batch is a file under ``$MIXERDISTILL_CACHE/teacher_samples/<key>/``, the key a hash of
the teacher and every setting that changes the text (not the sample count): an interrupted run keeps
its finished batches, a re-run reads them, a run asking for more samples adds only the missing ones.

On reading, degenerate samples (repetition loops, see ``repeated_ngram_share``), too-short ones and
exact duplicates are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from pydantic import Field, field_validator
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from mixerdistill.cache import cache_dir
from mixerdistill.console import stderr_console
from mixerdistill.data import DataSource, DataSourceConfig, resolve_input_path
from mixerdistill.errors import UserError

SAMPLER_VERSION = 1  # part of the cache key: bump when the sampling loop changes its output
META_FILE = "meta.json"

# Short openings of many kinds of text, so the samples cover more than one register of the teacher.
BUILTIN_PROMPTS = [
    "Once upon a time",
    "The old lighthouse keeper",
    "She opened the letter and read:",
    "It was the last day of summer, and",
    "Chapter 1\n\n",
    "The dragon looked down at the village",
    '"Where have you been?" asked',
    "Dear Sir,\n\nI am writing to",
    "Dear Emma,\n\n",
    "Q: What is the capital of France?\nA:",
    "User: Can you help me plan a trip to Japan?\nAssistant:",
    "Interviewer: How did you start your company?\n",
    "How to bake bread at home:\n\n1.",
    "Instructions: Write a short poem about the sea.\n\n",
    "Here are five tips for better sleep:\n",
    "A list of things to pack for a camping trip:\n-",
    "def fibonacci(n):\n",
    "import numpy as np\n\n",
    "# A Python function that reverses a string\n",
    "SELECT name, age FROM",
    "<!DOCTYPE html>\n<html>",
    "The mitochondria is",
    "Photosynthesis is the process by which",
    "In physics, energy is",
    "The French Revolution began in",
    "Water boils at",
    "The theory of evolution",
    "BREAKING NEWS:",
    "The city council voted on Tuesday to",
    "Stock markets fell sharply today as",
    "In a recent study, researchers found that",
    "The weather forecast for the weekend",
    "Abstract\n\nWe propose",
    "Theorem 1. Let",
    "The recipe calls for",
    "Product review: I bought this",
    "Meeting notes, March 3:\n",
    "FAQ\n\nQ:",
    "Step 1:",
    "Once there was a little robot who",
    "My favourite memory from childhood is",
    "The history of the Roman Empire",
    "To install the package, run",
    "Error: file not found.",
    "The main character of the novel",
    "In conclusion,",
    "Why is the sky blue?",
    "Explain how a computer works.",
    "Tell me a joke.",
    "Translate into French: Good morning",
    "Summary of the article:",
    "The football match ended",
    "He walked into the room and",
]


class SampleSettings(DataSourceConfig):
    """The ``teacher_samples`` data source: text the teacher writes itself (made once, then cached)."""

    samples: int = Field(
        256, ge=2, description="How many samples to generate (before dropping degenerate ones and duplicates)."
    )
    max_new_tokens: int = Field(192, ge=1, description="Longest continuation per sample; a sample also ends at EOS.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of sampling.")
    top_p: float = Field(
        0.95, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens whose probability reaches top_p."
    )
    batch_size: int = Field(32, ge=1, description="Samples generated together (KV cache, left-padded prompts).")
    seed: int = Field(0, description="Seed of prompt order and sampling; batch b is seeded by (seed, b).")
    prompts: list[str] | None = Field(
        None,
        description="Prompts; default: a built-in set of ~50 openings of "
        "stories, dialogue, instructions, code, science, news, "
        "letters and lists.",
    )
    prompts_file: str | None = Field(
        None,
        description="A text file with one prompt per line (used in addition "
        "to `prompts`; `\\n` in a line stands for a line break).",
    )
    chat_template: bool = Field(
        False,
        description="Wrap each prompt as a user turn in the teacher's chat "
        "template (an error if the teacher has none).",
    )
    max_repeated_ngrams: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Drop a sample whose continuation repeats more than this share of its "
        "4-grams of tokens (repetition loops; fluent text stays below ~0.15).",
    )
    min_new_tokens: int = Field(16, ge=1, description="Drop a sample whose continuation is shorter than this.")

    @field_validator("prompts_file")
    @classmethod
    def _prompts_file_exists(cls, path, info):
        if path is None:
            return None
        path = resolve_input_path(path, info)
        if not Path(path).is_file():
            raise ValueError(f"no such file: {path}")
        return path

    def prompt_list(self) -> list[str]:
        prompts = list(self.prompts or [])
        if self.prompts_file:
            lines = Path(self.prompts_file).read_text(encoding="utf-8").splitlines()
            prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
        return prompts or list(BUILTIN_PROMPTS)

    def generation_key(self) -> dict:
        """The settings that change the generated text (the filters and the split are applied on reading)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "prompts": self.prompt_list(),
            "chat_template": self.chat_template,
            "sampler": SAMPLER_VERSION,
        }


def cache_key(teacher_identity: dict, settings: SampleSettings) -> str:
    text = json.dumps({"teacher": teacher_identity, **settings.generation_key()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- sampling ----------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) token ids drawn from (B, V) logits with temperature and nucleus sampling."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_batch(
    model: nn.Module,
    prompt_ids: list[list[int]],
    settings: SampleSettings,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Continuations (token ids, EOS excluded) of left-padded prompts, one forward per new token with the
    model's KV cache."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    cache = DynamicCache(config=model.config)
    rows = len(prompt_ids)
    new = torch.zeros(rows, 0, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    step_ids, positions = input_ids, (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(settings.max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        token = sample_next(logits, settings.temperature, settings.top_p, generator).to(device)
        token = token.masked_fill(done, pad_id)
        new = torch.cat([new, token[:, None]], dim=1)
        if eos_id is not None:
            done |= token == eos_id
        if bool(done.all()):
            break
        step_ids = token[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
    continuations = []
    for row, finished in zip(new.tolist(), done.tolist()):
        if finished and eos_id is not None:
            row = row[: row.index(eos_id)]
        continuations.append(row)
    return continuations


def repeated_ngram_share(ids: list[int], n: int = 4) -> float:
    """Share of the token n-grams of ``ids`` that repeat an earlier one (0: none; → 1: a loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def encode_prompt(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    if not chat_template:
        return tokenizer.encode(prompt, add_special_tokens=False)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("data: chat_template is true but the teacher's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


@torch.no_grad()
def forward_tokens_per_second(model: nn.Module, batch_size: int, seq_len: int) -> float:
    """The teacher's plain forward throughput at (batch_size, seq_len) random tokens (one timed pass)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    begin = time.perf_counter()
    model(input_ids=ids.to(device), use_cache=False)
    return batch_size * seq_len / (time.perf_counter() - begin)


def generate_samples(
    model: nn.Module, tokenizer, settings: SampleSettings, teacher_identity: dict, show_progress: bool = True
) -> tuple[list[dict], dict]:
    """(the kept samples, figures of the sampling) for these settings; the batches missing from the cache
    are made first. Each record: prompt, continuation, new_tokens, repeated_ngrams."""
    key = cache_key(teacher_identity, settings)
    entry = cache_dir("teacher_samples", key)
    prompts = settings.prompt_list()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    batches = -(-settings.samples // settings.batch_size)
    missing = [b for b in range(batches) if not (entry / _batch_file(b)).is_file()]
    eos_id = tokenizer.eos_token_id
    pad_id = eos_id if eos_id is not None else 0
    made_tokens, begin = 0, time.perf_counter()
    bar = Progress(
        TextColumn("[bold]teacher samples"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr_console,
        disable=not (show_progress and missing),
    )
    with bar:
        task = bar.add_task("samples", total=batches, completed=batches - len(missing), speed="-")
        for b in missing:
            texts = [
                prompts[order[i % len(prompts)]] for i in range(b * settings.batch_size, (b + 1) * settings.batch_size)
            ]
            prompt_ids = [encode_prompt(tokenizer, text, settings.chat_template) for text in texts]
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + b)
            continuations = sample_batch(model.eval(), prompt_ids, settings, eos_id, pad_id, generator)
            records = [
                {
                    "prompt": tokenizer.decode(p, skip_special_tokens=False),
                    "continuation": tokenizer.decode(c, skip_special_tokens=True),
                    "new_tokens": len(c),
                    "repeated_ngrams": round(repeated_ngram_share(c), 4),
                }
                for p, c in zip(prompt_ids, continuations)
            ]
            _write_atomic(entry / _batch_file(b), "".join(json.dumps(r) + "\n" for r in records))
            made_tokens += sum(r["new_tokens"] for r in records)
            bar.advance(task)
            bar.update(task, speed=f"{made_tokens / (time.perf_counter() - begin):.0f}")
    records = [json.loads(line) for b in range(batches) for line in (entry / _batch_file(b)).read_text().splitlines()][
        : settings.samples
    ]
    kept, dropped = filter_samples(records, settings)
    meta = {
        "key": key,
        "generated": len(records),
        "kept": len(kept),
        "dropped": dropped,
        "new_tokens": sum(r["new_tokens"] for r in records),
        "kept_tokens": sum(r["new_tokens"] for r in kept),
    }
    if made_tokens:
        seconds = time.perf_counter() - begin
        forward = forward_tokens_per_second(model, settings.batch_size, settings.max_new_tokens)
        meta.update(
            made_tokens=made_tokens,
            seconds=round(seconds, 2),
            tokens_per_second=round(made_tokens / seconds, 1),
            teacher_forward_tokens_per_second=round(forward, 1),
        )
        _write_atomic(entry / META_FILE, json.dumps(meta, indent=2) + "\n")
        stderr_console.print(
            f"[bold]teacher samples[/]: {made_tokens:,} new tokens at {made_tokens / seconds:,.0f} "
            f"tok/s (the teacher's plain forward: {forward:,.0f} tok/s at {settings.batch_size} × "
            f"{settings.max_new_tokens} tokens)"
        )
    stderr_console.print(
        f"[bold]teacher samples[/]: kept {len(kept)} of {len(records)} ({meta['kept_tokens']:,} "
        f"new tokens; dropped {dropped['degenerate']} repetition loops, {dropped['short']} short, "
        f"{dropped['duplicate']} duplicates)"
    )
    return kept, meta


def filter_samples(records: list[dict], settings: SampleSettings) -> tuple[list[dict], dict[str, int]]:
    """The records without repetition loops, too-short continuations and exact duplicates (whitespace
    normalised), in order; and how many were dropped for each reason."""
    dropped = {"degenerate": 0, "short": 0, "duplicate": 0}
    seen: set[str] = set()
    kept = []
    for record in records:
        text = " ".join((record["prompt"] + record["continuation"]).split())
        if record["repeated_ngrams"] > settings.max_repeated_ngrams:
            dropped["degenerate"] += 1
        elif record["new_tokens"] < settings.min_new_tokens:
            dropped["short"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(text)
            kept.append(record)
    return kept, dropped


def _batch_file(index: int) -> str:
    return f"batch_{index:05d}.jsonl"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class TeacherSamples(DataSource):
    """Text sampled from the teacher (``bind`` gives it the teacher before documents are read). The last
    ``heldout_fraction`` of the kept samples is the held-out split, never trained on."""

    Config = SampleSettings
    needs_teacher = True

    def __init__(self, config: SampleSettings):
        super().__init__(config)
        self.records: list[dict] | None = None
        self.meta: dict = {}

    def bind(self, model: nn.Module, tokenizer, teacher_identity: dict, show_progress: bool = True) -> None:
        self.records, self.meta = generate_samples(model, tokenizer, self.config, teacher_identity, show_progress)

    def documents(self, split: str) -> Iterable[str]:
        if self.records is None:
            raise RuntimeError("teacher_samples used before bind() gave it the teacher")
        texts = [r["prompt"] + r["continuation"] for r in self.records]
        cut = len(texts) - max(1, round(len(texts) * self.config.heldout_fraction))
        return texts[:cut] if split == "train" else texts[cut:]
