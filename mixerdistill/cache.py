"""The on-disk cache (converted teachers, extracted corpora) and atomic publication of its entries."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$MIXERDISTILL_CACHE`` (else ``$XDG_CACHE_HOME/mixerdistill`` or ``~/.cache/mixerdistill``)
    joined with ``parts``; created if missing."""
    root = os.environ.get("MIXERDISTILL_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mixerdistill"
    path = path.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` to fill; on normal exit it is renamed to ``final``
    in one step, so a half-written entry is never seen under the final name.

    On an exception the temporary folder is removed. If another process published ``final`` first,
    its entry is kept and ours is discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
