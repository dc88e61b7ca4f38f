"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input (recipe, path, name, command-line option): the message says what to change."""


class RecipeError(UserError):
    """A recipe failed validation; `problems` holds one (dotted_path, message) pair per error."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem(s){where}:"]
        lines += [f"  {path or '<root>'}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))


class OutputError(UserError):
    """The run directory cannot be written (disk full, no permission, read-only file system)."""


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an OutputError that says how to continue."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(
            f"cannot write {Path(path)}: {reason}. Fix that (free disk space, permissions), "
            f"then continue with `mixerdistill run ... --resume`: the last complete "
            f"checkpoint is kept"
        ) from None
