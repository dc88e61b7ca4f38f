"""Teacher samples: the KV-cache sampling loop, seeding, the on-disk cache, resuming, the filters."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import tiny_llama
from mixerdistill.data import ByteTokenizer, TokenData
from mixerdistill.domains import Domain, check_no_leak
from mixerdistill.errors import UserError
from mixerdistill.sampling import (
    BUILTIN_PROMPTS,
    NUCLEUS_CANDIDATES,
    SampleSettings,
    TeacherSamples,
    cache_key,
    filter_samples,
    generate_samples,
    prompt_pool,
    repeated_ngram_share,
    sample_batch,
    sample_next,
)

SETTINGS = {
    "samples": 6,
    "batch_size": 4,
    "max_new_tokens": 12,
    "min_new_tokens": 1,
    "max_repeated_ngrams": 1.0,
    "prompts": ["Once upon", "A", "The cat sat on the"],
}
IDENTITY = {"source": "config", "test": "tiny llama"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class CountingTeacher(torch.nn.Module):
    """Counts forward calls; fails at call ``fail_at`` (an interruption)."""

    def __init__(self, model, fail_at: int | None = None):
        super().__init__()
        self.model, self.config, self.calls, self.fail_at = model, model.config, 0, fail_at

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.model(**kwargs)


def test_cached_sampling_equals_recomputing_without_cache():
    """Greedy (top_p → 0) continuations of left-padded prompts with the KV cache equal a loop that
    recomputes each prompt alone, unpadded."""
    model, tokenizer = tiny_llama(), ByteTokenizer()
    prompts = [tokenizer.encode(p) for p in ("Once upon a time", "A", "The cat")]
    settings = SampleSettings(max_new_tokens=10, top_p=1e-9)
    cached = sample_batch(model, prompts, settings, eos_id=None, pad_id=0, generator=torch.Generator())
    for prompt, continuation in zip(prompts, cached):
        ids = list(prompt)
        for _ in range(10):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert continuation == ids[len(prompt) :]


def test_nucleus_sampling_draws_only_from_the_nucleus_even_beyond_the_candidates():
    vocab = NUCLEUS_CANDIDATES * 4
    peaked = torch.full((vocab,), -30.0)
    peaked[[5, 9, 2000]] = torch.tensor([3.0, 2.0, 0.5])  # nucleus at top_p 0.9: {5, 9}
    flat = torch.zeros(vocab)
    flat[: vocab // 2] = 5.0  # nucleus: 90 % of the 2048 raised tokens, more than the candidates
    logits = torch.stack([peaked, flat]).repeat(200, 1)
    tokens = sample_next(logits, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert set(tokens[0::2].tolist()) == {5, 9}
    drawn_flat = tokens[1::2]
    assert bool((drawn_flat < vocab // 2).all())
    assert drawn_flat.unique().numel() > NUCLEUS_CANDIDATES // 8  # the whole nucleus, not the candidates' prefix
    assert int(drawn_flat.max()) >= NUCLEUS_CANDIDATES  # ids past the first candidates are reached


def test_samples_are_seeded_and_cached(cache):
    model, tokenizer = tiny_llama(), ByteTokenizer()
    first, meta = generate_samples(model, tokenizer, SampleSettings(**SETTINGS), IDENTITY, show_progress=False)
    assert len(first) == 6 and all(r["new_tokens"] == 12 for r in first)
    assert meta["generated"] == 6 and meta["made_tokens"] == 8 * 12  # whole batches of 4
    counting = CountingTeacher(model)
    again, meta = generate_samples(counting, tokenizer, SampleSettings(**SETTINGS), IDENTITY, show_progress=False)
    assert again == first and counting.calls == 0 and "made_tokens" not in meta  # read from the cache
    more, _ = generate_samples(
        counting, tokenizer, SampleSettings(**{**SETTINGS, "samples": 10}), IDENTITY, show_progress=False
    )
    assert more[:6] == first and counting.calls == 12 + 1  # one batch more (+1: the throughput pass)
    other, _ = generate_samples(
        model, tokenizer, SampleSettings(**{**SETTINGS, "seed": 1}), IDENTITY, show_progress=False
    )
    assert other != first
    assert len(list(cache.glob("teacher_samples/*"))) == 2
    generate_samples(model, tokenizer, SampleSettings(**SETTINGS), {"other": 1}, show_progress=False)
    assert len(list(cache.glob("teacher_samples/*"))) == 3  # the key includes the teacher
    shutil.rmtree(cache)  # the same settings in a fresh cache give the same text
    assert generate_samples(model, tokenizer, SampleSettings(**SETTINGS), IDENTITY, show_progress=False)[0] == first


def test_interrupted_sampling_resumes_with_the_same_text(cache, tmp_path, monkeypatch):
    model, tokenizer = tiny_llama(), ByteTokenizer()
    settings = SampleSettings(**SETTINGS)
    interrupted = CountingTeacher(model, fail_at=settings.max_new_tokens + 3)  # inside the second batch
    with pytest.raises(KeyboardInterrupt):
        generate_samples(interrupted, tokenizer, settings, IDENTITY, show_progress=False)
    assert [p.name for p in cache.glob("teacher_samples/*/batch_*")] == ["batch_00000.jsonl"]
    resumed = CountingTeacher(model)
    samples, _ = generate_samples(resumed, tokenizer, settings, IDENTITY, show_progress=False)
    assert resumed.calls == settings.max_new_tokens + 1  # only the second batch was made (+1: throughput)
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "fresh"))
    assert samples == generate_samples(model, tokenizer, settings, IDENTITY, show_progress=False)[0]


def test_filters_drop_loops_short_samples_and_duplicates():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6, 7, 8]) == 0
    assert repeated_ngram_share([1, 2, 3] * 20) > 0.9
    settings = SampleSettings(min_new_tokens=4)
    records = [
        {"prompt": "A", "continuation": " fine text", "new_tokens": 9, "repeated_ngrams": 0.0},
        {"prompt": "A", "continuation": "  fine   text", "new_tokens": 10, "repeated_ngrams": 0.0},
        {"prompt": "B", "continuation": " the the the", "new_tokens": 40, "repeated_ngrams": 0.8},
        {"prompt": "C", "continuation": ".", "new_tokens": 1, "repeated_ngrams": 0.0},
    ]
    kept, dropped = filter_samples(records, settings)
    assert kept == records[:1]
    assert dropped == {"degenerate": 1, "short": 1, "duplicate": 1}


def test_teacher_samples_source_splits_off_heldout_samples(cache):
    source = TeacherSamples(SampleSettings(**{**SETTINGS, "samples": 8, "heldout_fraction": 0.25}))
    with pytest.raises(RuntimeError, match="bind"):
        source.documents("train")
    source.bind(tiny_llama(), ByteTokenizer(), IDENTITY, show_progress=False)
    train, heldout = list(source.documents("train")), list(source.documents("heldout"))
    kept = source.meta["kept"]
    assert len(heldout) == round(kept * 0.25) and len(train) + len(heldout) == kept
    assert not set(train) & set(heldout)


def prefix_settings(folder, **prefixes) -> SampleSettings:
    """Samples prompted by 10-token prefixes of the text files a, b, c, short in ``folder``; c is held out."""
    documents = {"a": "Alpha text " * 30, "b": "Bravo words " * 30, "c": "Charlie held out " * 30, "short": "tiny"}
    for name, text in documents.items():
        (folder / f"{name}.txt").write_text(text)
    source = {"source": "text", "paths": [str(folder / "*.txt")], "heldout_paths": [str(folder / "c.txt")]}
    settings = {key: value for key, value in SETTINGS.items() if key != "prompts"}
    return SampleSettings.model_validate({**settings, "prefixes": {"data": source, "tokens": 10, **prefixes}})


def test_prefix_prompts_are_first_tokens_of_training_documents_seeded_and_cached(cache, tmp_path):
    model, tokenizer = tiny_llama(), ByteTokenizer()
    settings = prefix_settings(tmp_path)
    source = TeacherSamples(settings)
    source.bind(model, tokenizer, IDENTITY, show_progress=False)
    assert prompt_pool(settings, tokenizer)[0] == ["Alpha text", "Bravo word"]  # c held out, short too short
    with_builtin = settings.model_copy(update={"builtin_prompts": True})
    assert prompt_pool(with_builtin, tokenizer)[0] == [*BUILTIN_PROMPTS, "Alpha text", "Bravo word"]
    assert {r["prompt"] for r in source.records} == {"Alpha text", "Bravo word"}
    again, counting = TeacherSamples(settings), CountingTeacher(model)
    again.bind(counting, tokenizer, IDENTITY, show_progress=False)
    assert again.records == source.records and counting.calls == 0  # read from the cache
    explicit = SampleSettings(**{**SETTINGS, "prompts": ["Alpha text", "Bravo word"]})
    pool = prompt_pool(settings, tokenizer)[0]
    assert cache_key(IDENTITY, settings, pool) != cache_key(IDENTITY, explicit, pool)  # the key has the prefixes
    windows = [prompt_pool(prefix_settings(tmp_path, position="random", count=6), tokenizer)[0] for _ in range(2)]
    reseeded = prefix_settings(tmp_path, position="random", count=6).model_copy(update={"seed": 1})
    assert windows[0] == windows[1] != prompt_pool(reseeded, tokenizer)[0]
    trained = [(tmp_path / f"{name}.txt").read_text() for name in ("a", "b")]
    assert len(windows[0]) == 6 and all(any(p in text for text in trained) for p in windows[0])  # never from c
    with pytest.raises(UserError, match="no document of 400 training tokens"):
        prompt_pool(prefix_settings(tmp_path, tokens=400), tokenizer)


def test_a_prefix_source_holding_an_evaluation_domain_is_refused(cache, tmp_path):
    """A document that is an evaluation domain cannot become a prompt: the leak check reads the whole
    training split that prefixes are cut from."""
    tokenizer = ByteTokenizer()
    source = TeacherSamples(prefix_settings(tmp_path))
    source.bind(tiny_llama(), tokenizer, IDENTITY, show_progress=False)
    data = TokenData(source, tokenizer)
    heldout_text = (tmp_path / "c.txt").read_text()
    check_no_leak([Domain("held", torch.zeros(1, 8, dtype=torch.long), heldout_text)], data, tokenizer)
    trained_text = (tmp_path / "b.txt").read_text()
    with pytest.raises(UserError, match="whose prompt prefixes come from 'text'"):
        check_no_leak([Domain("mine", torch.zeros(1, 8, dtype=torch.long), trained_text)], data, tokenizer)
