"""Data: sources of documents, tokenisation, and fixed-length token batches.

A ``DataSource`` (a plugin) yields documents for training and, optionally, a held-out split. ``TokenData``
turns them into one token stream per split (documents joined by EOS), cut into windows of ``seq_len``
tokens. The training order is a seeded permutation of windows; held-out tokens are never trained on.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mixerdistill.errors import RecipeError, UserError

TOKENIZE_PIECE_CHARS = 20_000  # long documents are tokenised in pieces cut at line breaks


class DataSourceConfig(BaseModel):
    """Base of every data source's pydantic Config."""

    model_config = ConfigDict(extra="forbid")
    heldout_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of the token stream held out for evaluation when the source has no held-out split.",
    )


class DataSource:
    """Documents for training and evaluation. Subclasses set ``Config`` and implement ``documents``."""

    Config: ClassVar[type[DataSourceConfig]] = DataSourceConfig
    streaming: ClassVar[bool] = False  # True: training documents are read lazily, never all at once

    def __init__(self, config: DataSourceConfig):
        self.config = config

    def documents(self, split: str) -> Iterable[str] | None:
        """Documents of ``split`` ('train' or 'heldout'); None for 'heldout' means: split it off the stream."""
        raise NotImplementedError


class DataSourceBlock(BaseModel):
    """A data block inside another source's settings: ``source`` names a data source plugin, the other
    keys are that source's fields (validated here, so errors name their place in the recipe)."""

    model_config = ConfigDict(extra="allow")
    source: str = Field(description="Registered data source name; that source's fields go beside it.")
    _config: DataSourceConfig | None = PrivateAttr(None)

    @field_validator("source")
    @classmethod
    def _registered(cls, name: str) -> str:
        from mixerdistill.plugins import get_dataset

        try:
            get_dataset(name)
        except UserError as error:
            raise ValueError(str(error)) from None
        return name

    @model_validator(mode="after")
    def _source_fields(self, info: ValidationInfo):
        from mixerdistill.plugins import get_dataset

        config_cls = get_dataset(self.source).Config
        try:
            self._config = config_cls.model_validate(self.model_extra or {}, context=info.context)
        except ValidationError as error:
            raise ValidationError.from_exception_data(
                error.title, [_named_unknown_field(e, config_cls) for e in error.errors()]
            ) from None
        return self

    @model_serializer
    def _with_defaults(self, info) -> dict:
        return {"source": self.source, **self.config.model_dump(mode=info.mode)}

    @property
    def config(self) -> DataSourceConfig:
        return self._config

    def build(self) -> DataSource:
        from mixerdistill.plugins import get_dataset

        return get_dataset(self.source)(self.config)


def _named_unknown_field(error: dict, config_cls: type[BaseModel]) -> dict:
    """A pydantic error of a nested source's fields, re-raised as is, except that an unknown key lists the
    source's fields (the recipe's error report cannot look them up from the nested place)."""
    from mixerdistill.plugins import suggest

    details = {"type": error["type"], "loc": error["loc"], "input": error["input"], "ctx": error.get("ctx")}
    if error["type"] == "extra_forbidden":
        key, fields = str(error["loc"][-1]), list(config_cls.model_fields)
        message = f"unknown field '{key}'{suggest(key, fields)}; allowed: source, {', '.join(fields)}"
        details["type"] = PydanticCustomError("unknown_field", message)
    return {k: v for k, v in details.items() if v is not None}


class PathsConfig(DataSourceConfig):
    """Mixin for sources reading local files given as glob patterns."""

    paths: list[str] = Field(min_length=1, description="Files or glob patterns (recursive ** allowed).")
    heldout_paths: list[str] = Field(
        default_factory=list, description="Files held out for evaluation (then heldout_fraction is unused)."
    )

    @field_validator("paths", "heldout_paths")
    @classmethod
    def _patterns_match(cls, patterns: list[str], info: ValidationInfo) -> list[str]:
        patterns = [resolve_input_path(p, info) for p in patterns]
        missing = [p for p in patterns if not expand_paths([p])]
        if missing:
            raise ValueError(f"no file matches {', '.join(repr(p) for p in missing)}")
        return patterns


def resolve_input_path(path: str, info: ValidationInfo) -> str:
    """A recipe's relative input path, made absolute against the recipe file's folder."""
    base = (info.context or {}).get("base_dir")
    expanded = Path(path).expanduser()
    if base is None or expanded.is_absolute():
        return str(expanded)
    return str(Path(base) / expanded)


def expand_paths(patterns: list[str]) -> list[Path]:
    """Sorted files matching the glob patterns (a plain path matches itself)."""
    files: list[Path] = []
    for pattern in patterns:
        files += sorted(
            Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True) if Path(p).is_file()
        )
    return files


# Share of bytes that are NUL or not valid UTF-8 above which a file is refused as not text. Measured
# with benchmarks/text_threshold.py (docs/reliability.md): 0 in each of 1,214 UTF-8 text files of this
# machine and 172 files of the Austen corpus; above the limit in 1,416 of 1,420 executables, libraries,
# .pyc, PNG and gzip files (1st percentile 0.25). Legacy 8-bit or CJK encodings spread over 0–0.97 and
# are refused from 0.1% up (98%), since read as UTF-8 they would train on replacement characters.
NON_TEXT_LIMIT = 0.001


def non_text_bytes(data: bytes) -> tuple[int, int, str]:
    """(NUL bytes, bytes that are not valid UTF-8, the text with each of those as one U+DC80–U+DCFF)."""
    text = data.decode("utf-8", errors="surrogateescape")
    undecodable = 0 if text.isascii() else sum(1 for character in text if "\udc80" <= character <= "\udcff")
    return data.count(0), undecodable, text


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a UserError naming the file when it is not text (NON_TEXT_LIMIT)."""
    data = Path(path).read_bytes()
    nul, undecodable, text = non_text_bytes(data)
    if data and (nul + undecodable) / len(data) > NON_TEXT_LIMIT:
        raise UserError(
            f"{path} is not UTF-8 text: {nul} NUL and {undecodable} undecodable byte(s) of "
            f"{len(data)} ({(nul + undecodable) / len(data):.1%}, above {NON_TEXT_LIMIT:.1%}). "
            f"Remove it from the data paths, or convert it (e.g. iconv -f LATIN1 -t UTF-8)"
        )
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


def _byte_characters() -> list[str]:
    """The printable character standing for each byte value in byte-level BPE vocabularies (GPT-2's map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, spare = [], 256
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(spare))
            spare += 1
    return characters


class ByteTokenizer:
    """UTF-8 bytes as token ids 0–255 (id 0, the NUL byte, doubles as end-of-text). For tiny test teachers."""

    eos_token_id = 0
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text('{"type": "bytes"}\n')

    def to_transformers(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (byte-level BPE without merges:
        the same ids), for libraries that need one, such as lm-eval."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        characters = _byte_characters()
        backend = Tokenizer(models.BPE(vocab={c: byte for byte, c in enumerate(characters)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        eos = characters[self.eos_token_id]
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)


def tokenize_documents(tokenizer, documents: Iterable[str]) -> torch.Tensor:
    """One (N,) int64 stream: each document's tokens followed by EOS."""
    eos = eos_id(tokenizer)
    pieces: list[list[int]] = []
    for document in documents:
        for piece in _split_at_lines(document, TOKENIZE_PIECE_CHARS):
            pieces.append(tokenizer.encode(piece, add_special_tokens=False))
        pieces.append([eos])
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.tensor([t for piece in pieces for t in piece], dtype=torch.long)


def eos_id(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _split_at_lines(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


class TokenData:
    """The train and held-out token streams of one data source.

    Finite sources are tokenised once; a streaming source's training text is tokenised as batches are
    drawn, with a seeded shuffle buffer of windows.
    """

    SHUFFLE_WINDOWS = 4096

    def __init__(self, source: DataSource, tokenizer):
        self.source = source
        self.tokenizer = tokenizer
        heldout_documents = source.documents("heldout")
        self.train: torch.Tensor | None = None
        if source.streaming:
            if heldout_documents is None:
                raise UserError("a streaming data source needs its own held-out split")
            self.heldout = tokenize_documents(tokenizer, heldout_documents)
            return
        train = tokenize_documents(tokenizer, source.documents("train"))
        if not (train != eos_id(tokenizer)).any():
            raise UserError(
                "data: the source gave no training text (no documents, or only empty ones): "
                "check data.paths (or the source's settings)"
            )
        if heldout_documents is None:
            cut = int(len(train) * (1 - source.config.heldout_fraction))
            train, heldout = train[:cut], train[cut:]
        else:
            heldout = tokenize_documents(tokenizer, heldout_documents)
        if len(train) == 0:
            raise UserError("the data source gave no training text")
        self.train = train
        self.heldout = heldout

    def check_batches(self, stages) -> None:
        """Before any training: the training text must give at least one full batch for every stage
        (``stages``: the recipe's stage blocks); a streaming source is not measured."""
        if self.train is None:
            return
        problems = [
            (
                f"stages.{i}",
                (
                    f"{block.config.batch_size} × {block.config.seq_len} tokens per batch, but "
                    f"the training text has {len(self.train)} tokens"
                ),
            )
            for i, block in enumerate(stages)
            if len(self.train) // block.config.seq_len < block.config.batch_size
        ]
        if problems:
            raise RecipeError(problems, "the data (too little training text: add text, or lower batch_size or seq_len)")

    @property
    def train_tokens(self) -> int | None:
        """Training tokens (None for a streaming source)."""
        return len(self.train) if self.train is not None else None

    def train_batches(self, batch_size: int, seq_len: int, seed: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless (batch_size, seq_len) batches of training windows in a seeded order.

        Each pass over finite data is a fresh permutation of the windows (seed + pass number);
        ``start_batch`` skips that many batches (resuming).
        """
        if self.train is None:
            yield from self._streamed_batches(batch_size, seq_len, seed, start_batch)
            return
        windows = len(self.train) // seq_len
        if windows < batch_size:
            raise UserError(
                f"the training text has {len(self.train)} tokens: too few for a batch of "
                f"{batch_size} × {seq_len}; lower batch_size or seq_len, or add text"
            )
        per_pass = windows // batch_size
        index = start_batch
        while True:
            epoch, position = divmod(index, per_pass)
            order = torch.randperm(windows, generator=torch.Generator().manual_seed(seed + epoch))
            chosen = order[position * batch_size : (position + 1) * batch_size]
            starts = chosen * seq_len
            yield torch.stack([self.train[s : s + seq_len] for s in starts.tolist()])
            index += 1

    def _streamed_batches(self, batch_size: int, seq_len: int, seed: int, start_batch: int) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        buffer: list[torch.Tensor] = []
        pending = torch.zeros(0, dtype=torch.long)
        produced = 0
        while True:
            for document in self.source.documents("train"):
                pending = torch.cat([pending, tokenize_documents(self.tokenizer, [document])])
                while len(pending) >= seq_len:
                    buffer.append(pending[:seq_len])
                    pending = pending[seq_len:]
                while len(buffer) >= self.SHUFFLE_WINDOWS:
                    picks = torch.randperm(len(buffer), generator=generator)[:batch_size].tolist()
                    batch = torch.stack([buffer[i] for i in picks])
                    for i in sorted(picks, reverse=True):
                        buffer.pop(i)
                    if produced >= start_batch:
                        yield batch
                    produced += 1

    def heldout_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """(N, seq_len) consecutive held-out windows covering at most ``max_tokens`` tokens."""
        count = min(len(self.heldout), max_tokens) // seq_len
        if count == 0:
            raise UserError(
                f"the held-out text has {len(self.heldout)} tokens: too few for one window of {seq_len} (eval.seq_len)"
            )
        return self.heldout[: count * seq_len].view(count, seq_len)
