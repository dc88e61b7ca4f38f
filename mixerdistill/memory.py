"""Process memory: the peak resident set the report records, and (opt-in) glibc told to give freed tensors back.

glibc serves a large allocation with its own ``mmap`` only above a threshold that grows, by default, to the
size of the largest block freed so far (up to 32 MiB). A training step frees and reallocates many tensors
below that size; they land in the heap, which fragments and is rarely returned to the system, so the
process keeps memory it no longer uses. ``MIXERDISTILL_RETURN_FREED_MEMORY=1`` fixes the threshold at
1 MiB, so every larger tensor is a mapping of its own, unmapped when freed. Measured on the SmolLM2 demo
(docs/performance.md): stage 3's peak 3.06 GB instead of 4.04, but every such allocation faults in fresh
zeroed pages and the stages run at ~60 % of their speed (`make demo` 18 min 38 s) — hence opt-in.

What every run does instead is ``release_freed_memory``: glibc's ``malloc_trim`` hands the free pages inside
the heap back to the system after every optimizer step. It takes 0.1 s on a 4 GB heap; on the demo's
window-attention + Mamba-2 student it brings stage 3's peak from 5.52 to 5.06 GB and the resident memory
between stages from 4.2–4.7 GB to 2.3–2.9 GB (docs/performance.md). Trimming between forward and
backward as well did not lower any stage's peak. The run also trims between its phases (before each stage,
the final evaluation and lm-eval): what a phase leaves in the heap (a stage's evaluation, its checkpoint
write) would otherwise be the next phase's floor — 1.9–2.8 GB instead of 1.4 GB in a traced demo run.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import sys

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20
# "1": fix the threshold (a user's own MALLOC_MMAP_THRESHOLD_ is always kept).
ENV_VARIABLE = "MIXERDISTILL_RETURN_FREED_MEMORY"


def _glibc():
    """glibc's C library with ``mallopt`` and ``malloc_trim``; None elsewhere (macOS, musl, …)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 — only glibc has both
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def return_freed_memory() -> bool:
    """When ``MIXERDISTILL_RETURN_FREED_MEMORY=1``, fix glibc's mmap threshold at 1 MiB for this process
    (Linux with glibc only); whether it was set. Called once by the command line before any tensor is made."""
    if _LIBC is None or os.environ.get(ENV_VARIABLE) != "1" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_freed_memory(collect: bool = False) -> None:
    """Give the free pages inside glibc's heap back to the system (``malloc_trim``); elsewhere nothing.
    ``collect``: first free what only reference cycles still hold (``gc.collect``; between phases of a run)."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def peak_rss_gb(children: bool = False) -> float:
    """This process's peak resident set so far, in GB (10⁹ bytes): what GNU time reports as maximum RSS;
    ``children``: that of the largest child process waited for so far instead."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)  # macOS reports bytes, Linux KiB
