"""Unseen-domain evaluation: teacher and student perplexity on named text sets that never enter training.

Built-in domains (``eval.domains`` names):

- ``heldout``: the training data's held-out split as stored (for Austen: the held-out novel with its hard
  line breaks);
- ``heldout_reflowed``: the same text with each paragraph's lines joined (another format of known text);
- ``pydoc``: Python's documentation topics (``pydoc_data.topics``, shipped with CPython): technical prose;
- ``teacher_samples``: the held-out slice of the teacher's own samples (those of the mixture's
  ``teacher_samples`` source, else made with that source's defaults).

A recipe adds local files as ``{name: ..., path: ...}`` (text, or JSON lines with a ``text`` field).
``check_no_leak`` fails the run when the text of a domain appears in the training stream, or in the
training split that teacher_samples cuts prompts from; the figure that sums a student up is the
geometric mean of its student/teacher perplexity ratios.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mixerdistill.data import (
    DataSource,
    expand_paths,
    read_text_file,
    resolve_input_path,
    tokenize_documents,
)
from mixerdistill.errors import UserError
from mixerdistill.evaluation import perplexity

BUILTIN_DOMAINS = ("heldout", "heldout_reflowed", "pydoc", "teacher_samples")
PROBE_CHARS = 160  # a domain "appears in training" when one of its probes of this length does


class DomainFiles(BaseModel):
    """A domain read from local files: plain text (one document per file) or JSON lines (``text``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Name of the domain in reports.")
    path: str = Field(
        description="A file or glob pattern (relative to the recipe); *.jsonl files are read as "
        "JSON lines with a `text` field."
    )

    @field_validator("path")
    @classmethod
    def _matches(cls, path: str, info: ValidationInfo) -> str:
        path = resolve_input_path(path, info)
        if not expand_paths([path]):
            raise ValueError(f"no file matches '{path}'")
        return path

    @field_validator("name")
    @classmethod
    def _not_builtin(cls, name: str) -> str:
        if name in BUILTIN_DOMAINS:
            raise ValueError(f"'{name}' is a built-in domain: name yours differently")
        return name


def domain_name(entry: str | DomainFiles) -> str:
    return entry if isinstance(entry, str) else entry.name


def check_domain_names(entries: list) -> list:
    """Validator of ``eval.domains``: built-in names are known ones, no name is used twice."""
    from mixerdistill.plugins import suggest

    for entry in entries:
        if isinstance(entry, str) and entry not in BUILTIN_DOMAINS:
            raise ValueError(
                f"unknown built-in domain '{entry}'{suggest(entry, BUILTIN_DOMAINS)}; built-ins: "
                f"{', '.join(BUILTIN_DOMAINS)} (or give {{name: ..., path: ...}})"
            )
    names = [domain_name(e) for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"domain named twice: {', '.join(repeated)}")
    return entries


@dataclass
class Domain:
    name: str
    windows: torch.Tensor  # (N, T) token windows scored for perplexity
    text: str  # the scored text (decoded windows), for the leak check


# -- documents of the built-in domains ---------------------------------------------------------
def reflow(text: str) -> str:
    """Paragraphs (blocks between blank lines) with their lines joined by single spaces."""
    paragraphs = re.split(r"\n\s*\n", text)
    return "\n\n".join(
        " ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs if p.strip()
    )


def pydoc_documents() -> list[str]:
    """Python's documentation topics, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def heldout_documents(sources: dict[str, DataSource]) -> list[str] | None:
    """The held-out documents of the first source that has a held-out split of its own."""
    for source in sources.values():
        documents = source.documents("heldout")
        if documents is not None:
            return list(documents)
    return None


def file_documents(spec: DomainFiles) -> list[str]:
    documents = []
    for path in expand_paths([spec.path]):
        if path.suffix == ".jsonl":
            lines = read_text_file(path).splitlines()
            documents += [json.loads(line)["text"] for line in lines if line.strip()]
        else:
            documents.append(read_text_file(path))
    return documents


def load_domains(
    entries: list,
    data,
    sources: dict[str, DataSource],
    tokenizer,
    seq_len: int,
    tokens: int,
    teacher_samples: Callable[[], DataSource],
) -> list[Domain]:
    """The windows of each domain of ``eval.domains``: at most ``tokens`` tokens in windows of ``seq_len``.
    ``data`` is the training data (its held-out stream is the ``heldout`` domain); ``teacher_samples()``
    gives the teacher_samples source when the mixture has none."""
    domains = []
    for entry in entries:
        name = domain_name(entry)
        if name == "heldout":
            stream = data.heldout
        else:
            if name == "heldout_reflowed":
                documents = heldout_documents(sources)
                if documents is None:
                    raise UserError(
                        "eval.domains: 'heldout_reflowed' needs a data source with its own held-out "
                        "documents (such as austen's held-out novel)"
                    )
                documents = [reflow(d) for d in documents]
            elif name == "pydoc":
                documents = pydoc_documents()
            elif name == "teacher_samples":
                source = next((s for s in sources.values() if getattr(s, "needs_teacher", False)), None)
                documents = list((source or teacher_samples()).documents("heldout"))
            else:
                documents = file_documents(entry)
            stream = tokenize_documents(tokenizer, documents)
        count = min(len(stream), tokens) // seq_len
        if count == 0:
            raise UserError(f"eval.domains: '{name}' has {len(stream)} tokens, too few for one window of {seq_len}")
        windows = stream[: count * seq_len].view(count, seq_len)
        domains.append(Domain(name, windows, tokenizer.decode(windows.reshape(-1).tolist())))
    return domains


# -- the leak check ----------------------------------------------------------------------------
def normalise(text: str) -> str:
    return " ".join(text.split())


def probes(text: str, count: int = 16) -> list[str]:
    """Up to ``count`` spans of PROBE_CHARS characters spread evenly over ``text`` (whitespace-normalised)."""
    text = normalise(text)
    if len(text) <= PROBE_CHARS:
        return [text] if text else []
    step = (len(text) - PROBE_CHARS) / max(1, count - 1)
    return list(dict.fromkeys(text[round(i * step) : round(i * step) + PROBE_CHARS] for i in range(count)))


def training_texts(data, tokenizer) -> dict[str, str]:
    """Source name → the whitespace-normalised text of the training stream it feeds (decoded tokens). A
    source whose prompts are cut from another source's training split (teacher_samples' ``prefixes``) adds
    that whole split: a prompt may come from anywhere in it."""
    parts = getattr(data, "parts", None)
    feeds = {p.name: p.data for p in parts} if parts else {"data": data}  # name → its TokenData
    streams = {name: feed.train for name, feed in feeds.items()}
    for name, feed in feeds.items():
        prefixes = getattr(feed.source, "prefix_train", None)
        if prefixes is not None:
            streams[f"{name}, whose prompt prefixes come from '{feed.source.config.prefixes.data.source}'"] = prefixes
    return {
        name: normalise(tokenizer.decode(stream.tolist())) for name, stream in streams.items() if stream is not None
    }


def check_no_leak(domains: list[Domain], data, tokenizer) -> None:
    """Raise UserError when a span of an evaluated domain's text appears in the training stream."""
    texts = training_texts(data, tokenizer)
    for domain in domains:
        for probe in probes(domain.text):
            for source, text in texts.items():
                if probe in text:
                    raise UserError(
                        f"eval.domains: the evaluation text of domain '{domain.name}' appears in the "
                        f"training stream of data source '{source}' (e.g. “{probe[:80]}…”); "
                        f"remove it from the training data or from eval.domains"
                    )


# -- figures -----------------------------------------------------------------------------------
def domain_perplexities(model, domains: list[Domain], batch_size: int, device) -> dict[str, float]:
    return {d.name: perplexity(model, d.windows, batch_size, device) for d in domains}


def domain_table(teacher: dict[str, float], student: dict[str, float]) -> tuple[dict[str, dict], float | None]:
    """({domain: {teacher, student, ratio}}, geometric mean of the ratios)."""
    table = {
        name: {"teacher": teacher[name], "student": student[name], "ratio": student[name] / teacher[name]}
        for name in student
        if name in teacher
    }
    ratios = [row["ratio"] for row in table.values()]
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None
    return table, geomean


class DomainEvaluation:
    """The domains of a recipe's ``eval.domains``, checked against the training stream, with the
    teacher's perplexity on each measured once."""

    def __init__(self, domains: list[Domain], batch_size: int, device):
        self.domains, self.batch_size, self.device = domains, batch_size, device

    @classmethod
    def for_recipe(
        cls, recipe, data, sources: dict[str, DataSource], tokenizer, teacher, device, show_progress: bool = True
    ) -> DomainEvaluation | None:
        """None when the recipe names no domain; raises UserError when a domain leaks into training."""
        if not recipe.eval.domains:
            return None
        from mixerdistill.mixture import make_source
        from mixerdistill.sampling import SampleSettings

        def default_samples() -> DataSource:
            return make_source(
                "teacher_samples",
                SampleSettings(),
                tokenizer,
                teacher,
                recipe.teacher.model_dump(mode="json"),
                show_progress,
            )

        domains = load_domains(
            recipe.eval.domains,
            data,
            sources,
            tokenizer,
            recipe.eval.seq_len,
            recipe.eval.domain_tokens,
            default_samples,
        )
        check_no_leak(domains, data, tokenizer)
        return cls(domains, recipe.eval.batch_size, device)

    def measure(self, model) -> dict[str, float]:
        return domain_perplexities(model, self.domains, self.batch_size, self.device)
