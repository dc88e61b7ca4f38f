"""Offline lm-eval tasks made from the held-out novel: ``austen_ppl``, ``austen_cloze``, ``austen_choice``.

The tasks are written as lm-eval task YAMLs next to JSON-lines data files, into a cache folder named
after the novel, the seed and the generator version, so the same data is used every time:

- ``austen_ppl``    rolling log-likelihood of ~2,000-character passages (word and byte perplexity,
                    bits per byte), like lm-eval's ``wikitext``.
- ``austen_cloze``  LAMBADA-style: a paragraph without its last word; the model must give that word
                    (accuracy of the greedy continuation, and perplexity of the word).
- ``austen_choice`` three sentences of context, then the true next sentence among four; the three
                    distractors are sentences drawn from elsewhere in the same novel (acc, acc_norm).

Text handling: the novel's lines are joined into paragraphs (blank lines separate them), chapter and
volume headings are dropped, and sentences are split after ``.``, ``!`` or ``?`` (not after titles such
as "Mr.") when the next one opens with a capital letter or a quote.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from mixerdistill.cache import cache_dir, publish_dir

GENERATOR_VERSION = 2  # bump when the generated data changes, so cached task folders are rebuilt
TASK_NAMES = ("austen_ppl", "austen_cloze", "austen_choice")
PASSAGE_CHARS = 2000  # austen_ppl: paragraphs are gathered into passages of at least this many characters
CLOZE_MIN_WORDS = 40  # austen_cloze: paragraphs shorter than this give too little context
CHOICE_CONTEXT_SENTENCES = 3
CHOICE_WORDS = (6, 40)  # austen_choice: answer and distractor sentences have this many words (inclusive)
CHOICES = 4

_HEADING = re.compile(r"^(chapter|volume)\b|^(the )?end\b|^finis\b", re.IGNORECASE)
_TITLES = ("Mr", "Mrs", "Dr", "St", "Col", "Capt", "Sir", "Esq", "Messrs", "Lieut", "Gen", "Rev")
_SENTENCE_END = re.compile(r"(?<=[.!?])(?P<close>[\"'”’_)]*)\s+(?=[\"'“‘_(]?[A-Z])")
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]+)(?P<tail>[.!?][\"'”’_]*)$", re.DOTALL)


def paragraphs(text: str) -> list[str]:
    """The novel's paragraphs, each on one line with single spaces; headings and title lines dropped."""
    found = []
    for block in re.split(r"\n\s*\n", text):
        paragraph = " ".join(block.split())
        if paragraph and not _HEADING.match(paragraph) and len(paragraph.split()) >= 4:
            found.append(paragraph)
    return found


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences, keeping abbreviations such as "Mr. Elliot" together."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        before = paragraph[start : match.start()]
        if before.split() and before.split()[-1].rstrip(".") in _TITLES:
            continue
        pieces.append(paragraph[start : match.end("close")].strip())
        start = match.end()
    pieces.append(paragraph[start:].strip())
    return [p for p in pieces if p]


def ppl_documents(paras: list[str]) -> list[dict]:
    """Consecutive paragraphs gathered into passages of at least PASSAGE_CHARS characters."""
    documents, current = [], []
    for paragraph in paras:
        current.append(paragraph)
        passage = "\n\n".join(current)
        if len(passage) >= PASSAGE_CHARS:
            documents.append({"text": passage})
            current = []
    return documents


def cloze_documents(paras: list[str]) -> list[dict]:
    """Paragraphs of CLOZE_MIN_WORDS+ words ending in a plain word and . ! or ?; the word is the target."""
    documents = []
    for paragraph in paras:
        match = _LAST_WORD.match(paragraph)
        if match and len(paragraph.split()) >= CLOZE_MIN_WORDS and len(match["word"]) > 1:
            documents.append({"context": match["context"], "target": " " + match["word"]})
    return documents


def choice_documents(paras: list[str], rng: random.Random) -> list[dict]:
    """Context of CHOICE_CONTEXT_SENTENCES sentences, the true next sentence and three distractors.

    Distractors come from other paragraphs, have CHOICE_WORDS words and differ from the answer; the
    answer's position among the four is drawn from ``rng``.
    """
    low, high = CHOICE_WORDS
    split = [sentences(p) for p in paras]
    pool = [(i, s) for i, group in enumerate(split) for s in group if low <= len(s.split()) <= high]
    documents = []
    for index, group in enumerate(split):
        if len(group) <= CHOICE_CONTEXT_SENTENCES:
            continue
        answer = group[CHOICE_CONTEXT_SENTENCES]
        if not low <= len(answer.split()) <= high:
            continue
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            other, sentence = pool[rng.randrange(len(pool))]
            if other != index and sentence != answer and sentence not in distractors:
                distractors.append(sentence)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        documents.append({"context": " ".join(group[:CHOICE_CONTEXT_SENTENCES]), "choices": choices, "label": label})
    return documents


def task_configs(data_dir: Path) -> dict[str, dict]:
    """lm-eval task YAML contents, by task name, reading their data from ``data_dir``."""

    def data(name: str) -> dict:
        return {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_dir / f"{name}.jsonl")}},
            "test_split": "test",
        }

    return {
        "austen_ppl": {
            "task": "austen_ppl",
            **data("austen_ppl"),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": GENERATOR_VERSION},
        },
        "austen_cloze": {
            "task": "austen_cloze",
            **data("austen_cloze"),
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            "target_delimiter": "",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": GENERATOR_VERSION},
        },
        "austen_choice": {
            "task": "austen_choice",
            **data("austen_choice"),
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": GENERATOR_VERSION},
        },
    }


def write_tasks(text: str, directory: Path, seed: int = 0, data_dir: Path | None = None) -> None:
    """Write the three tasks' data (``<task>.jsonl``) and YAMLs (``<task>.yaml``) made from ``text``.

    The YAMLs point at the data files in ``data_dir`` (default: ``directory``), the folder they will
    finally be read from.
    """
    paras = paragraphs(text)
    documents = {
        "austen_ppl": ppl_documents(paras),
        "austen_cloze": cloze_documents(paras),
        "austen_choice": choice_documents(paras, random.Random(seed)),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in documents.items():
        with open(directory / f"{name}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    for name, config in task_configs(Path(data_dir or directory).resolve()).items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def austen_task_dir(novel: str = "Persuasion", seed: int = 0) -> Path:
    """The folder of the offline tasks made from ``novel`` (generated on first use, then cached).

    Pass it to lm-eval as ``--include_path``; the YAMLs hold absolute paths of their data files.
    """
    from mixerdistill.austen import austen_novels

    slug = re.sub(r"\W+", "_", novel.lower()).strip("_")
    final = cache_dir("lm_eval_tasks") / f"austen-{slug}-seed{seed}-v{GENERATOR_VERSION}"
    if (final / f"{TASK_NAMES[-1]}.yaml").is_file():
        return final
    text = austen_novels()[novel]
    with publish_dir(final) as folder:
        write_tasks(text, folder, seed, data_dir=final)
    return final
