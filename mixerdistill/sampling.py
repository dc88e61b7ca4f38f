"""Teacher-sampled training text: the teacher's own distribution as a data source (sequence-level KD).

``generate_samples`` draws continuations of prompts from the teacher in batches, with its KV cache,
temperature and nucleus (top-p) sampling. Batch ``b`` is seeded with ``seed`` and ``b`` alone, so a
batch is the same whether it is made in one go, after an interruption, or for a larger ``samples``.
Each finished batch is a file under ``$MIXERDISTILL_CACHE/teacher_samples/<key>/``, the key a hash of
the teacher and every setting that changes the text (not the sample count): an interrupted run keeps
its finished batches, a re-run reads them, a run asking for more samples adds only the missing ones.

Prompts come from a built-in set, from the recipe, from a file, and from ``prefixes``: the first tokens
of documents (or seeded windows) of another source's training split. Under torchrun rank 0 makes the
batches while the other ranks wait, then every rank reads them.

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
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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
from mixerdistill.data import (
    DataSource,
    DataSourceBlock,
    DataSourceConfig,
    TokenData,
    eos_id,
    resolve_input_path,
)
from mixerdistill.distributed.world import current_world
from mixerdistill.errors import UserError

SAMPLER_VERSION = 2  # part of the cache key: bump when the sampling loop changes its output
META_FILE = "meta.json"
# Nucleus sampling looks for the nucleus among this many most likely tokens first (a full sort of the
# vocabulary only for rows whose nucleus is larger): on SmolLM2's 49,152 tokens, batch 32, 10 ms against
# the sort's 80 ms, and the draw among them 1 ms against 45 ms over the whole vocabulary.
NUCLEUS_CANDIDATES = 1024

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


class PrefixSettings(BaseModel):
    """Prompts cut from the training split of another data source (``teacher_samples.prefixes``)."""

    model_config = ConfigDict(extra="forbid")
    data: DataSourceBlock = Field(
        description="The data source the prompts are cut from: a data block, e.g. `{source: austen}` or "
        "`{source: text, paths: [...]}`. Only its training split is read, never its held-out text; a run "
        "is refused when the text of an `eval.domains` entry is in that split."
    )
    tokens: int = Field(32, ge=1, description="Length of each prompt in tokens (the teacher's tokenizer).")
    count: int = Field(
        256, ge=1, description="How many prompts to cut (fewer when the source has fewer documents or windows)."
    )
    position: Literal["start", "random"] = Field(
        "start",
        description="`start`: the first `tokens` tokens of documents (seeded choice among those long "
        "enough); `random`: windows at seeded random places. A prompt never spans two documents.",
    )

    @field_validator("data")
    @classmethod
    def _finite_text_source(cls, block: DataSourceBlock) -> DataSourceBlock:
        from mixerdistill.plugins import get_dataset

        source_cls = get_dataset(block.source)
        if getattr(source_cls, "needs_teacher", False) or source_cls.streaming:
            raise ValueError(
                f"'{block.source}' cannot give prompt prefixes: it is streamed or made by the teacher; "
                f"use a finite source (austen, text, jsonl, ...)"
            )
        return block


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
    seed: int = Field(
        0, description="Seed of prompt order, prefix choice and sampling; batch b is seeded by (seed, b)."
    )
    prompts: list[str] | None = Field(
        None,
        description="Prompts. All prompt kinds given (`prompts`, `prompts_file`, `prefixes`, the built-in "
        "set) are pooled, and samples cycle through the pool in a seeded order: each kind's share of "
        "the samples is its share of the pool.",
    )
    prompts_file: str | None = Field(
        None,
        description="A text file with one prompt per line (pooled with the other prompts; `\\n` in a "
        "line stands for a line break).",
    )
    prefixes: PrefixSettings | None = Field(
        None,
        description="Prompts cut from the training split of another data source (pooled with the other prompts).",
    )
    builtin_prompts: bool | None = Field(
        None,
        description="The built-in set of ~50 openings of stories, dialogue, instructions, code, "
        "science, news, letters and lists. null: used when no other prompts are given; true: pooled "
        "with them; false: never.",
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

    @model_validator(mode="after")
    def _some_prompts(self):
        if self.builtin_prompts is False and not (self.prompts or self.prompts_file or self.prefixes):
            raise ValueError("builtin_prompts is false but no prompts are given (prompts, prompts_file or prefixes)")
        return self

    def prompt_list(self, prefix_texts: Iterable[str] = ()) -> list[str]:
        """The prompt pool: the built-in set (see ``builtin_prompts``), ``prompts``, the lines of
        ``prompts_file`` and ``prefix_texts`` (the prompts ``prefix_prompts`` cut), in that order."""
        given = list(self.prompts or [])
        if self.prompts_file:
            lines = Path(self.prompts_file).read_text(encoding="utf-8").splitlines()
            given += [line.replace("\\n", "\n") for line in lines if line.strip()]
        given += prefix_texts
        builtin = self.builtin_prompts if self.builtin_prompts is not None else not given
        return (list(BUILTIN_PROMPTS) if builtin else []) + given

    def generation_key(self, prompts: list[str]) -> dict:
        """The settings that change the generated text (the filters and the split are applied on reading);
        ``prompts``: the prompt pool."""
        key = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "prompts": prompts,
            "chat_template": self.chat_template,
            "sampler": SAMPLER_VERSION,
        }
        if self.prefixes is not None:  # only then: the keys of samples cached before prefixes existed hold
            key["prefixes"] = self.prefixes.model_dump(mode="json")
        return key


def cache_key(teacher_identity: dict, settings: SampleSettings, prompts: list[str]) -> str:
    text = json.dumps({"teacher": teacher_identity, **settings.generation_key(prompts)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- sampling ----------------------------------------------------------------------------------
def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) token ids drawn from (B, V) logits with temperature and nucleus sampling."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    candidates, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    tokens = _draw_from_nucleus(candidates, order, top_p, generator)
    wide = (candidates.sum(-1) < top_p).nonzero()[:, 0]
    if len(wide):  # rows whose nucleus reaches beyond the candidates: drawn again from the whole vocabulary
        tokens[wide] = _draw_from_nucleus(*probs[wide].sort(dim=-1, descending=True), top_p, generator)
    return tokens


def _draw_from_nucleus(
    sorted_probs: torch.Tensor, order: torch.Tensor, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """(B,) token ids: ``order`` (B, K) the K most likely token ids, ``sorted_probs`` (B, K) theirs, descending."""
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
    choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


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
    """The teacher's plain forward throughput at (batch_size, seq_len) random tokens (one timed pass).

    Like a sampling step, the pass projects only the last position onto the vocabulary: whole
    (batch_size, seq_len, V) logits would be the run's largest tensor (0.8 GB for SmolLM2 at 32 × 128)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    begin = time.perf_counter()
    model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    return batch_size * seq_len / (time.perf_counter() - begin)


# -- prompts cut from another source ------------------------------------------------------------
def prefix_prompts(train: torch.Tensor, prefixes: PrefixSettings, tokenizer, seed: int) -> list[str]:
    """Up to ``prefixes.count`` prompts of ``prefixes.tokens`` tokens cut from ``train``, a (N,) token
    stream of documents each ended by EOS: documents' first tokens, or windows at random places
    (``prefixes.position``); seeded by ``seed``, in stream order, none spanning two documents."""
    eos, length = eos_id(tokenizer), prefixes.tokens
    is_eos = train == eos  # (N,)
    if prefixes.position == "start":
        starts = torch.cat([torch.zeros(1, dtype=torch.long), is_eos.nonzero().squeeze(-1) + 1])  # document starts
    else:
        starts = torch.arange(len(train))
    starts = starts[starts + length <= len(train)]
    eos_before = torch.cat([torch.zeros(1, dtype=torch.long), is_eos.long().cumsum(0)])  # (N + 1,) EOS in train[:i]
    starts = starts[eos_before[starts + length] == eos_before[starts]]  # no EOS inside the window
    if len(starts) == 0:
        raise UserError(
            f"data: prefixes.data ('{prefixes.data.source}') has no document of {length} training tokens "
            f"or more; lower prefixes.tokens"
        )
    chosen = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))[: prefixes.count]
    return [tokenizer.decode(train[s : s + length].tolist()) for s in starts[chosen.sort().values].tolist()]


def prompt_pool(settings: SampleSettings, tokenizer) -> tuple[list[str], torch.Tensor | None]:
    """(the prompt pool, the (N,) training stream of ``prefixes.data`` the prefixes were cut from, or
    None without prefixes). Only the source's training split is read: its held-out text is never a prompt."""
    if settings.prefixes is None:
        return settings.prompt_list(), None
    train = TokenData(settings.prefixes.data.build(), tokenizer).train
    return settings.prompt_list(prefix_prompts(train, settings.prefixes, tokenizer, settings.seed)), train


# -- the cached batches ------------------------------------------------------------------------
def generate_samples(
    model: nn.Module,
    tokenizer,
    settings: SampleSettings,
    teacher_identity: dict,
    show_progress: bool = True,
    prompts: list[str] | None = None,
) -> tuple[list[dict], dict]:
    """(the kept samples, figures of the sampling) for these settings; the batches missing from the cache
    are made first. Each record: prompt, continuation, new_tokens, repeated_ngrams. ``prompts``: the pool
    (default: ``prompt_pool``'s). Under torchrun rank 0 makes the batches while the others wait, then
    they read them from the cache."""
    prompts = prompt_pool(settings, tokenizer)[0] if prompts is None else prompts
    key = cache_key(teacher_identity, settings, prompts)
    entry = cache_dir("teacher_samples", key)
    batches = -(-settings.samples // settings.batch_size)
    world = current_world()
    if not world.main:
        world.barrier()  # rank 0 samples first; the others then find its batches in the cache
    begin = time.perf_counter()
    made_tokens = make_batches(model, tokenizer, settings, prompts, entry, batches, show_progress and world.main)
    seconds = time.perf_counter() - begin
    if world.main:
        world.barrier()
    records = [json.loads(line) for b in range(batches) for line in (entry / _batch_file(b)).read_text().splitlines()]
    records = records[: settings.samples]
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
        forward = forward_tokens_per_second(model, settings.batch_size, settings.max_new_tokens)
        meta.update(
            made_tokens=made_tokens,
            seconds=round(seconds, 2),
            tokens_per_second=round(made_tokens / seconds, 1),
            teacher_forward_tokens_per_second=round(forward, 1),
        )
        _write_atomic(entry / META_FILE, json.dumps(meta, indent=2) + "\n")
    if world.main:
        _print_figures(meta, settings)
    return kept, meta


def make_batches(
    model: nn.Module,
    tokenizer,
    settings: SampleSettings,
    prompts: list[str],
    entry: Path,
    batches: int,
    show_progress: bool,
) -> int:
    """Sample the batches of ``range(batches)`` that ``entry`` (the cache folder) lacks, each written as
    its file once made; returns the new tokens made."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    missing = [b for b in range(batches) if not (entry / _batch_file(b)).is_file()]
    eos = tokenizer.eos_token_id
    pad_id = eos if eos is not None else 0
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
            continuations = sample_batch(model.eval(), prompt_ids, settings, eos, pad_id, generator)
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
    return made_tokens


def _print_figures(meta: dict, settings: SampleSettings) -> None:
    if "made_tokens" in meta:
        stderr_console.print(
            f"[bold]teacher samples[/]: {meta['made_tokens']:,} new tokens at {meta['tokens_per_second']:,.0f} "
            f"tok/s (the teacher's plain forward: {meta['teacher_forward_tokens_per_second']:,.0f} tok/s at "
            f"{settings.batch_size} × {settings.max_new_tokens} tokens)"
        )
    dropped = meta["dropped"]
    stderr_console.print(
        f"[bold]teacher samples[/]: kept {meta['kept']} of {meta['generated']} ({meta['kept_tokens']:,} "
        f"new tokens; dropped {dropped['degenerate']} repetition loops, {dropped['short']} short, "
        f"{dropped['duplicate']} duplicates)"
    )


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
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: ranks sharing a node-local cache may race
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
        self.prefix_train: torch.Tensor | None = None  # (N,) the stream prompt prefixes are cut from

    def bind(self, model: nn.Module, tokenizer, teacher_identity: dict, show_progress: bool = True) -> None:
        prompts, self.prefix_train = prompt_pool(self.config, tokenizer)
        self.records, self.meta = generate_samples(
            model, tokenizer, self.config, teacher_identity, show_progress, prompts
        )

    def documents(self, split: str) -> Iterable[str]:
        if self.records is None:
            raise RuntimeError("teacher_samples used before bind() gave it the teacher")
        texts = [r["prompt"] + r["continuation"] for r in self.records]
        cut = len(texts) - max(1, round(len(texts) * self.config.heldout_fraction))
        return texts[:cut] if split == "train" else texts[cut:]
