"""Data sources and token streams: local text and JSON lines, held-out splits, deterministic order."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from conftest import cli_in_process, write_recipe
from mixerdistill.data import NON_TEXT_LIMIT, ByteTokenizer, TokenData
from mixerdistill.errors import UserError
from mixerdistill.plugins import get_dataset


def make_source(name: str, **options):
    source_cls = get_dataset(name)
    return source_cls(source_cls.Config.model_validate(options))


def test_text_files_with_heldout_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 200)
    (tmp_path / "b.txt").write_text("beta " * 200)
    (tmp_path / "held.txt").write_text("gamma " * 50)
    source = make_source("text", paths=[str(tmp_path / "*.txt")], heldout_paths=[str(tmp_path / "held.txt")])
    data = TokenData(source, ByteTokenizer())
    assert b"gamma" not in bytes(data.train[data.train > 0].tolist())  # held-out file never trained on
    assert bytes(data.heldout[:5].tolist()) == b"gamma"
    assert len(data.train) == 1200 + 1000 + 2  # two documents, each followed by EOS


def test_heldout_fraction_splits_the_stream(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 999)
    data = TokenData(make_source("text", paths=[str(tmp_path / "a.txt")], heldout_fraction=0.2), ByteTokenizer())
    assert len(data.train) == 800 and len(data.heldout) == 200


def test_jsonl_source_and_bad_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i} " * 20}) for i in range(10)) + "\n")
    data = TokenData(make_source("jsonl", paths=[str(path)], text_field="body"), ByteTokenizer())
    assert bytes(data.train[:10].tolist()) == b"document 0"
    path.write_text('{"body": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"docs.jsonl:2"):
        TokenData(make_source("jsonl", paths=[str(path)], text_field="body"), ByteTokenizer())


def test_missing_files_fail_validation(tmp_path):
    with pytest.raises(ValueError, match="no file matches"):
        get_dataset("text").Config.model_validate({"paths": [str(tmp_path / "none*.txt")]})


def test_batches_are_seeded_and_cover_each_pass(tmp_path):
    letters = torch.randint(97, 123, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
    (tmp_path / "a.txt").write_text("".join(map(chr, letters)))
    data = TokenData(make_source("text", paths=[str(tmp_path / "a.txt")], heldout_fraction=0.1), ByteTokenizer())
    first = [b for _, b in zip(range(6), data.train_batches(4, 100, seed=3))]
    again = [b for _, b in zip(range(6), data.train_batches(4, 100, seed=3))]
    other = [b for _, b in zip(range(6), data.train_batches(4, 100, seed=4))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # 3600 training tokens = 36 windows = 9 batches per pass: one pass uses every window once.
    one_pass = torch.cat([b for _, b in zip(range(9), data.train_batches(4, 100, seed=0))])
    assert len({tuple(w.tolist()) for w in one_pass}) == 36
    resumed = next(data.train_batches(4, 100, seed=3, start_batch=5))
    assert torch.equal(resumed, first[5])


def test_too_little_text_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("short")
    data = TokenData(make_source("text", paths=[str(tmp_path / "a.txt")], heldout_fraction=0.5), ByteTokenizer())
    with pytest.raises(UserError, match="too few"):
        next(data.train_batches(4, 100, seed=0))


def test_austen_config_checks_titles():
    config = get_dataset("austen").Config
    assert config().heldout == "Persuasion"
    with pytest.raises(ValueError, match="did you mean 'Persuasion'"):
        config(heldout="Persuasions")
    with pytest.raises(ValueError, match="held out"):
        config(train=["Emma", "Persuasion"])


def test_hub_dataset_streams_without_reading_everything(monkeypatch):
    """The `hf` source streams: a stand-in `datasets` module yields endless documents."""
    import itertools
    import sys
    import types

    opened = []

    def load_dataset(path, name=None, split=None, streaming=False):
        assert streaming
        opened.append(split)
        if split == "validation":
            return ({"text": f"held out {i}. " * 5} for i in range(1000))
        return ({"text": f"train document {i}. " * 5} for i in itertools.count())

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = make_source("hf", path="org/corpus", heldout_documents=3)
    data = TokenData(source, ByteTokenizer())
    assert data.train is None and bytes(data.heldout[:10].tolist()) == b"held out 0"
    data.SHUFFLE_WINDOWS = 8
    batch = next(data.train_batches(2, 32, seed=0))
    assert batch.shape == (2, 32) and b"train document" in bytes(batch.flatten().tolist())
    assert opened == ["validation", "train"]


PROSE = "It is a truth universally acknowledged that a single man must be in want of a wife.\n" * 40


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_a_file_that_is_not_text_is_refused_by_name(tmp_path, source):
    executable = tmp_path / "python-binary"
    shutil.copy(sys.executable, executable)  # a real ELF executable
    with pytest.raises(UserError, match=f"{executable} is not UTF-8 text: .* NUL"):
        TokenData(make_source(source, paths=[str(executable)]), ByteTokenizer())


def test_text_encoding_threshold(tmp_path):
    """A stray byte that is not UTF-8 (below NON_TEXT_LIMIT) is read as text; Latin-1 prose above it and
    UTF-16 are refused."""
    stray = tmp_path / "stray.txt"
    stray.write_bytes(PROSE.encode() + b"caf\xe9\n")
    assert 1 / len(stray.read_bytes()) < NON_TEXT_LIMIT
    data = TokenData(make_source("text", paths=[str(stray)], heldout_fraction=0.1), ByteTokenizer())
    assert len(data.train) > 3000
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("Déjà vu à l'élève: " * 200).encode("latin-1"))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes(PROSE.encode("utf-16"))
    for path in (latin, utf16):
        with pytest.raises(UserError, match=f"{path} is not UTF-8 text"):
            TokenData(make_source("text", paths=[str(path)]), ByteTokenizer())


def test_empty_source_is_a_clear_error(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(UserError, match="gave no training text .*empty"):
        TokenData(make_source("text", paths=[str(tmp_path / "*.txt")]), ByteTokenizer())


def test_too_little_text_for_a_later_stage_fails_before_any_training(tmp_path):
    """Stages 1–2 fit the text, stage 3's batch does not: the run stops before stage 1, writing nothing."""
    (tmp_path / "small.txt").write_text(PROSE)  # 3,360 bytes: stage 3's 4 × 1024 tokens do not fit
    recipe = write_recipe(tmp_path)
    output = tmp_path / "run"
    code, text = cli_in_process(
        "run",
        str(recipe),
        "--output",
        str(output),
        "--no-progress",
        "--set",
        f"data.paths=[{tmp_path / 'small.txt'}]",
        "--set",
        "eval.tokens=128",
        "--set",
        "stages.2.seq_len=1024",
        "--set",
        "stages.2.tokens=8192",
        "--set",
        "eval.every_tokens=null",
    )
    assert code == 2, text
    assert "stages.2: 4 × 1024 tokens per batch" in text and "stages.0" not in text
    assert not output.exists()
