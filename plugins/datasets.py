"""Built-in data sources: local text files, local JSON-lines files, Hugging Face datasets, Jane Austen's
novels, and text sampled from the teacher (mixerdistill.sampling)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from pydantic import Field, model_validator

from mixerdistill.data import DataSource, DataSourceConfig, PathsConfig, expand_paths, read_text_file
from mixerdistill.errors import UserError
from mixerdistill.hookspecs import hookimpl
from mixerdistill.plugins import suggest
from mixerdistill.sampling import TeacherSamples


class TextFiles(DataSource):
    """Plain UTF-8 text files, one document per file."""

    class Config(PathsConfig):
        pass

    def documents(self, split: str):
        if split == "heldout" and not self.config.heldout_paths:
            return None
        patterns = self.config.paths if split == "train" else self.config.heldout_paths
        held = {p.resolve() for p in expand_paths(self.config.heldout_paths)}
        files = [p for p in expand_paths(patterns) if split == "heldout" or p.resolve() not in held]
        return (read_text_file(path) for path in files)


class JsonLines(DataSource):
    """JSON-lines files, one document per line, its text under ``text_field``."""

    class Config(PathsConfig):
        text_field: str = Field("text", description="Key of the text in each JSON object.")

    def documents(self, split: str):
        if split == "heldout" and not self.config.heldout_paths:
            return None
        patterns = self.config.paths if split == "train" else self.config.heldout_paths
        return self._read(expand_paths(patterns))

    def _read(self, files) -> Iterator[str]:
        for path in files:
            for number, line in enumerate(read_text_file(path).split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[self.config.text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise UserError(
                        f"{path}:{number}: not a JSON object with a '{self.config.text_field}' string ({error})"
                    ) from None


class HubDataset(DataSource):
    """A Hugging Face dataset, streamed (needs network access and `pip install datasets`)."""

    streaming = True

    class Config(DataSourceConfig):
        path: str = Field(description="Dataset id, e.g. 'allenai/c4'.")
        name: str | None = Field(None, description="Dataset configuration, e.g. 'en'.")
        split: str = Field("train", description="Split used for training.")
        heldout_split: str | None = Field(
            "validation",
            description="Split used for evaluation; null: hold out the first heldout_documents of `split`.",
        )
        heldout_documents: int = Field(2000, ge=1, description="How many documents the held-out split keeps.")
        train_documents: int | None = Field(None, ge=1, description="Cap on training documents (streamed).")
        text_field: str = Field("text", description="Column holding the text.")

    def _stream(self, split: str):
        try:
            import datasets
        except ImportError:
            raise UserError("data.source 'hf' needs the `datasets` package: pip install 'mixerdistill[hub]'") from None
        return datasets.load_dataset(self.config.path, self.config.name, split=split, streaming=True)

    def documents(self, split: str):
        config = self.config
        if split == "heldout":
            stream = self._stream(config.heldout_split or config.split)
            return (row[config.text_field] for _, row in zip(range(config.heldout_documents), stream))
        stream = self._stream(config.split)
        skip = 0 if config.heldout_split else config.heldout_documents
        limit = None if config.train_documents is None else skip + config.train_documents
        return (row[config.text_field] for i, row in enumerate(stream) if i >= skip and (limit is None or i < limit))


class AustenNovels(DataSource):
    """Jane Austen's six novels (fetched once from Debian's r-cran-janeaustenr); one novel held out."""

    class Config(DataSourceConfig):
        heldout: str = Field("Persuasion", description="Novel used only for evaluation, never for training.")
        train: list[str] | None = Field(None, description="Novels to train on; default: all but the held-out one.")

        @model_validator(mode="after")
        def _known_titles(self):
            from mixerdistill.austen import NOVELS

            titles = list(NOVELS.values())
            for title in [self.heldout, *(self.train or [])]:
                if title not in titles:
                    raise ValueError(f"unknown novel '{title}'{suggest(title, titles)}; novels: {', '.join(titles)}")
            if self.heldout in (self.train or []):
                raise ValueError(f"'{self.heldout}' is held out and cannot also be trained on")
            return self

    def documents(self, split: str):
        from mixerdistill.austen import austen_novels

        novels = austen_novels()
        if split == "heldout":
            return [novels[self.config.heldout]]
        titles = self.config.train or [t for t in novels if t != self.config.heldout]
        return [novels[t] for t in titles]


@hookimpl
def register_datasets(register):
    register("text", TextFiles)
    register("jsonl", JsonLines)
    register("hf", HubDataset)
    register("austen", AustenNovels)
    register("teacher_samples", TeacherSamples)
