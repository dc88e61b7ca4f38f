"""Fault injection for tests: environment variables that make a process SIGKILL itself at a known point.

They exist only so tests can kill a run where a real crash could happen and check what survives; no
other code reads them.

- ``MIXERDISTILL_FAULT_KILL_IN_CHECKPOINT=N``: die while writing the N-th checkpoint of this process
  (files written, manifest not yet, folder not renamed).
- ``MIXERDISTILL_FAULT_KILL_RANK=R@N``: rank R dies after its N-th optimizer step in this process (counted
  over all stages), once any checkpoint due at that step is written.
- ``MIXERDISTILL_FAULT_SIGNAL=R@N:SIGNAME[,SIGNAME…]``: rank R sends itself those signals right after its
  N-th optimizer step of a run (counted over all stages), before the run checks for a stop
  (mixerdistill.interrupt).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_IN_CHECKPOINT = "MIXERDISTILL_FAULT_KILL_IN_CHECKPOINT"
KILL_RANK = "MIXERDISTILL_FAULT_KILL_RANK"
SEND_SIGNAL = "MIXERDISTILL_FAULT_SIGNAL"
_reached: Counter[str] = Counter()  # how often each point was reached in this process


def _die_if(variable: str, expected: str) -> None:
    if os.environ.get(variable) == expected:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_written() -> None:
    """Called while a checkpoint is half written."""
    _reached[KILL_IN_CHECKPOINT] += 1
    _die_if(KILL_IN_CHECKPOINT, str(_reached[KILL_IN_CHECKPOINT]))


def step_done(rank: int) -> None:
    """Called after each optimizer step (and any checkpoint it triggered)."""
    _reached[KILL_RANK] += 1
    _die_if(KILL_RANK, f"{rank}@{_reached[KILL_RANK]}")


def signal_point(rank: int, steps: int) -> None:
    """Called after each optimizer step of a run that handles stop signals (``steps``: its optimizer steps
    so far in this run, over all stages), before its stop check."""
    target, _, names = os.environ.get(SEND_SIGNAL, "").partition(":")
    if target == f"{rank}@{steps}":
        for name in names.split(","):
            os.kill(os.getpid(), getattr(signal, name))
