"""Training data of a recipe: one source, or a weighted mixture of several.

``MixedData`` draws each training window from one of its sources with probability proportional to the
source's weight. Window ``i`` of batch ``b`` takes its source from a generator seeded by (seed, b); each
source walks through its own windows in a seeded permutation per pass. So the stream is a pure
function of (seed, batch number): resuming at batch ``b`` gives exactly the batches an uninterrupted run
would have drawn, and the share each source received can be counted before training starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mixerdistill.data import DataSource, TokenData
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.plugins import get_dataset


@dataclass
class MixPart:
    name: str  # the source name, numbered when a source appears twice ("text", "text#2")
    source: DataSource
    data: TokenData
    weight: float


class MixedData:
    """Train batches drawn from several sources by weight; the held-out split is the first source's."""

    def __init__(self, parts: list[MixPart]):
        self.parts = parts
        self.train = None  # no single training stream; see train_tokens
        self.heldout = parts[0].data.heldout
        self.heldout_windows = parts[0].data.heldout_windows
        total = sum(p.weight for p in parts)
        self.probabilities = torch.tensor([p.weight / total for p in parts], dtype=torch.float64)

    @property
    def train_tokens(self) -> int:
        return sum(len(p.data.train) for p in self.parts)

    def check_batches(self, stages) -> None:
        """Before any training: every source must give at least one window of each stage's seq_len (a
        batch draws its windows from the sources by weight, each source walking its own windows pass after
        pass); ``stages``: the recipe's stage blocks."""
        problems = [
            (
                f"data.mix.{i}",
                f"'{p.name}' has {len(p.data.train)} training tokens: too few for one "
                f"window of {block.config.seq_len} (stages.{j})",
            )
            for i, p in enumerate(self.parts)
            for j, block in enumerate(stages)
            if len(p.data.train) // block.config.seq_len < 1
        ]
        if problems:
            raise RecipeError(
                problems, "the data (too little training text: add text to that source, or lower seq_len)"
            )

    def source_picks(self, batch_size: int, batch: int, seed: int) -> torch.Tensor:
        """(batch_size,) index of the source of each window of batch number ``batch``."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + batch)
        return torch.multinomial(self.probabilities, batch_size, replacement=True, generator=generator)

    def drawn_windows(self, batch_size: int, batches: int, seed: int) -> list[int]:
        """How many windows each source gives to the first ``batches`` batches."""
        counts = torch.zeros(len(self.parts), dtype=torch.long)
        for batch in range(batches):
            counts += torch.bincount(self.source_picks(batch_size, batch, seed), minlength=len(self.parts))
        return counts.tolist()

    def train_batches(self, batch_size: int, seq_len: int, seed: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless (batch_size, seq_len) batches; ``start_batch`` skips that many (resuming exactly)."""
        walkers = [_WindowWalk(p, seq_len, seed + 7919 * i) for i, p in enumerate(self.parts)]
        for walker, count in zip(walkers, self.drawn_windows(batch_size, start_batch, seed)):
            walker.position = count
        batch = start_batch
        while True:
            yield torch.stack([walkers[i].next() for i in self.source_picks(batch_size, batch, seed).tolist()])
            batch += 1

    def shares(self, stages, default_seed: int) -> list[dict]:
        """Per source: weight, training tokens, and the tokens and share the recipe's stages draw from it
        (``stages``: the recipe's stage blocks; a stage without its own seed uses default_seed + index)."""
        drawn = torch.zeros(len(self.parts), dtype=torch.long)
        for index, block in enumerate(stages, start=1):
            config = block.config
            seed = config.seed if config.seed is not None else default_seed + index
            drawn += torch.tensor(self.drawn_windows(config.batch_size, config.steps(), seed)) * config.seq_len
        total = int(drawn.sum())
        return [
            {
                "source": p.name,
                "weight": p.weight,
                "train_tokens": len(p.data.train),
                "drawn_tokens": int(d),
                "share": round(int(d) / total, 4) if total else None,
            }
            for p, d in zip(self.parts, drawn.tolist())
        ]


class _WindowWalk:
    """The windows of one source in a fresh seeded permutation per pass."""

    def __init__(self, part: MixPart, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = part.data.train, seq_len, seed
        self.windows = len(self.tokens) // seq_len
        if self.windows == 0:
            raise UserError(
                f"data source '{part.name}' has {len(self.tokens)} training tokens: too few for one window of {seq_len}"
            )
        self.position = 0
        self._pass, self._order = -1, None

    def next(self) -> torch.Tensor:
        epoch, index = divmod(self.position, self.windows)
        if epoch != self._pass:
            self._order = torch.randperm(self.windows, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._pass = epoch
        self.position += 1
        start = int(self._order[index]) * self.seq_len
        return self.tokens[start : start + self.seq_len]


def build_data(
    data_block, tokenizer, teacher=None, teacher_identity: dict | None = None, show_progress: bool = True
) -> tuple[TokenData | MixedData, dict[str, DataSource]]:
    """The recipe's training data and its sources by name. A source that needs the teacher
    (teacher_samples) is given it first, so its samples are made (or read from the cache)."""
    blocks = data_block.mix if data_block.mix else [data_block]
    sources: dict[str, DataSource] = {}
    for block in blocks:
        name = block.source if block.source not in sources else f"{block.source}#{len(sources) + 1}"
        sources[name] = make_source(block.source, block.config, tokenizer, teacher, teacher_identity, show_progress)
    if not data_block.mix:
        return TokenData(next(iter(sources.values())), tokenizer), sources
    parts = []
    for (name, source), block in zip(sources.items(), blocks):
        if source.streaming:
            raise UserError(f"data.mix: source '{name}' is streamed; a mixture takes finite sources only")
        parts.append(MixPart(name, source, TokenData(source, tokenizer), block.weight))
    return MixedData(parts), sources


def make_source(
    name: str, config, tokenizer, teacher=None, teacher_identity: dict | None = None, show_progress: bool = True
) -> DataSource:
    source = get_dataset(name)(config)
    if getattr(source, "needs_teacher", False):
        if teacher is None:
            raise UserError(f"data source '{name}' needs the teacher")
        source.bind(teacher, tokenizer, teacher_identity or {}, show_progress)
    return source
