"""``RunReport``: the figures of a run, one typed model that ``run``, report.md, ``ablate``, ``compare``
and ``eval`` all read and write. Its JSON form is ``report.json`` (keys as they have always been)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mixerdistill.errors import UserError

REPORT_FILE = "report.json"
OPTIONAL = ("samples", "eval", "plots", "seconds", "peak_rss_gb")  # keys report.json holds only once they are known
# Figures of the unseen-domain evaluation (eval.domains): report.json holds them only when measured.
DOMAIN_KEYS = ("domains", "domain_ratio_geomean", "domains_after_transfer", "domains_after", "mix")
HYBRID_KEYS = ("keep_attention", "keep_attention_by")  # absent from reports of runs that kept no attention
MEMORY_KEYS = ("peak_rss_gb",)  # absent from reports written before it was measured


class _Figures(BaseModel):
    model_config = ConfigDict(extra="allow")  # reports written by later versions still load


class TeacherFigures(_Figures):
    source: str
    adapter: str
    parameters: int
    perplexity: float | None = None  # on the held-out windows; None without eval.tokens
    domains: dict[str, float] | None = None  # {domain: perplexity} (eval.domains)


class StudentFigures(_Figures):
    mixers: dict[str, int]  # {mixer name: layers}
    keep_attention: list[int] | None = None  # layers that kept the teacher's attention (None: none)
    keep_attention_by: str | None = None  # the ranking measure that chose them (keep_attention: {auto: K, by})
    parameters: int
    perplexity_after_transfer: float | None = None
    perplexity: float | None = None  # after the last stage
    domains_after_transfer: dict[str, float] | None = None
    domains: dict[str, dict[str, float]] | None = None  # {domain: {teacher, student, ratio}} after the last stage
    domain_ratio_geomean: float | None = None  # geometric mean of the student/teacher ratios


class DataFigures(_Figures):
    train_tokens: int | None  # None for a streaming source
    heldout_tokens: int
    eval_tokens: int
    mix: list[dict[str, Any]] | None = None  # per source of a mixture: weight, tokens and share of the training windows


class StageFigures(_Figures):
    """One trained stage (also stored in its checkpoint's manifest, so a resumed run reuses it)."""

    index: int
    name: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    loss_first: float
    loss_last: float
    perplexity_after: float | None = None
    domains_after: dict[str, float] | None = None
    peak_rss_gb: float | None = None  # the training process's peak resident set at the stage's end


class CurvePoint(_Figures):
    """Held-out perplexity after ``tokens`` training tokens (counted over all stages)."""

    stage_index: int
    tokens: int
    perplexity: float | None
    domains: dict[str, float] | None = None


class Samples(_Figures):
    prompt: str
    teacher: str
    student: str


class RunReport(_Figures):
    recipe: str
    teacher: TeacherFigures
    student: StudentFigures
    data: DataFigures
    stages: list[StageFigures] = Field(default_factory=list)
    curve: list[CurvePoint] = Field(default_factory=list)
    samples: Samples | None = None
    eval: dict[str, Any] | None = None  # lm-eval settings and scores (mixerdistill.harness.evaluate_pair)
    plots: list[str] | None = None
    seconds: float | None = None  # wall time of the whole run
    peak_rss_gb: float | None = None  # the process's peak resident set over the whole run (GB)

    def stage_curve(self, index: int) -> list[CurvePoint]:
        return [point for point in self.curve if point.stage_index == index]

    def to_json(self) -> dict:
        """report.json's content: every key, except the optional ones not known yet."""
        data = _drop_unmeasured_domains(self.model_dump(mode="json"))
        return {key: value for key, value in data.items() if not (key in OPTIONAL and value is None)}

    @classmethod
    def read(cls, directory: Path) -> RunReport:
        """The report of the run in ``directory``; UserError when it is missing or unreadable."""
        path = Path(directory) / REPORT_FILE
        try:
            return cls.model_validate_json(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{directory} has no readable {REPORT_FILE}: {error}") from None

    @classmethod
    def read_if_present(cls, directory: Path) -> RunReport | None:
        try:
            return cls.read(directory)
        except UserError:
            return None


def _drop_unmeasured_domains(value):
    """``value`` (report.json's content) without the keys of DOMAIN_KEYS, HYBRID_KEYS and MEMORY_KEYS that
    hold None."""
    if isinstance(value, dict):
        return {
            key: _drop_unmeasured_domains(item)
            for key, item in value.items()
            if not (key in DOMAIN_KEYS + HYBRID_KEYS + MEMORY_KEYS and item is None)
        }
    if isinstance(value, list):
        return [_drop_unmeasured_domains(item) for item in value]
    return value
