"""Stopping a run on request: SIGINT (Ctrl-C), SIGTERM (a scheduler preempting the job) and SIGUSR1 (a
scheduler's warning before that).

While a stage trains, the first signal only asks the run to stop: the step in progress ends, every rank
agrees on the step to stop at (``stop_requested``), a progress checkpoint of that step is written with
the usual atomic writer, and ``Interrupted`` travels up to the command line, which prints the exact
``--resume`` command and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A
second signal stops at once (the stage then continues from its last periodic checkpoint); so does the
first one outside a stage (loading the teacher, tokenising, evaluating), where nothing is lost.

Test hook: ``MIXERDISTILL_FAULT_SIGNAL`` (mixerdistill.faults) makes a rank send itself signals right after a
known optimizer step; tests use it to stop a run at a known step.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mixerdistill import faults
from mixerdistill.console import stderr_console

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
RESUME_COMMAND_VARIABLE = "MIXERDISTILL_RESUME_COMMAND"  # set by `run --nproc` for its ranks
STOP_TIMEOUT_SECONDS = 300  # `run --nproc`: how long torchrun waits for stopping ranks before SIGKILL


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + signum


def stop_exit_codes() -> set[int]:
    """The exit codes of a run that stopped on one of STOP_SIGNALS."""
    return {exit_code(s) for s in STOP_SIGNALS}


class Interrupted(BaseException):
    """The run stopped on a signal. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` on the way up swallows it; the CLI turns it into its message and exit code."""

    def __init__(self, signum: int, stage: int | None = None, step: int | None = None, at_once: bool = False):
        self.signum, self.stage, self.step, self.at_once = signum, stage, step, at_once
        super().__init__(self.describe())

    def describe(self) -> str:
        if self.stage is None:
            return f"interrupted by {signal.Signals(self.signum).name} outside a stage"
        if self.at_once:
            return (
                f"stopped at once by a second {signal.Signals(self.signum).name} in stage {self.stage}; "
                f"it continues from its last complete checkpoint"
            )
        return f"interrupted at stage {self.stage} step {self.step}"


@dataclass
class _Stage:
    index: int
    step: int  # optimizer steps of the stage done so far


class StopSignals:
    """Installs the handlers for STOP_SIGNALS while a run is in progress (see the module docstring)."""

    def __init__(self, main: bool):
        self.main = main  # whether this process prints (rank 0)
        self.pid = os.getpid()  # the process the handlers are for (forked children inherit them)
        self.requested: int | None = None  # the first signal received while a stage trained
        self.stage: _Stage | None = None
        self.steps_done = 0  # over all stages, for the test hook

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            # A forked child (a multiprocessing pool's worker, e.g. lm-eval's bootstrap) inherited this handler:
            # it ends as it would by default, or the pool that terminates it waits for ever.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.stage is None or self.requested is not None:
            raise Interrupted(
                self.requested or signum,
                self.stage and self.stage.index,
                self.stage and self.stage.step,
                at_once=self.stage is not None,
            )
        self.requested = signum
        if self.main:
            try:
                stderr_console.print(
                    f"[yellow]{signal.Signals(signum).name}[/]: stopping after this step and "
                    f"writing a checkpoint (send it again to stop at once)",
                    highlight=False,
                )
            except OSError:  # stderr is gone (a closed pipe or terminal): stop all the same
                pass


_active: StopSignals | None = None


@contextmanager
def stop_signals(main: bool = True) -> Iterator[StopSignals]:
    """Handle STOP_SIGNALS for the duration of a run. Handlers can only be installed in the main
    thread; elsewhere the signals keep their default behaviour."""
    global _active
    stops = StopSignals(main)
    installed = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stops._handle) for s in STOP_SIGNALS} if installed else {}
    _active = stops
    try:
        yield stops
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def begin_stage(index: int, step: int = 0) -> None:
    """Stage ``index`` starts training after ``step`` steps: from here a first signal waits for the
    step in progress to end."""
    if _active is not None:
        _active.stage = _Stage(index, step)


def end_stage(world) -> None:
    """The stage's own checkpoint is written: a stop asked for during the stage's last step or its
    evaluation takes effect now; from here on a signal stops at once."""
    stops = _active
    if stops is None or stops.stage is None:
        return
    if _agreed(world):
        raise interrupted()
    stops.stage = None


def stop_requested(step: int, world) -> bool:
    """After optimizer step ``step`` of the current stage: whether the run stops here, the same answer
    on every rank (a signal that reached any rank counts; one all-reduce of a flag under torchrun)."""
    _fault_point(world)
    if _active is not None and _active.stage is not None:
        _active.stage.step = step
    return _agreed(world)


def _agreed(world) -> bool:
    """Whether any rank was asked to stop; every rank then stops with that signal."""
    stops = _active
    local = stops.requested if stops is not None and stops.requested is not None else 0
    agreed = world.largest(local)
    if agreed and stops is not None and stops.requested is None:
        stops.requested = agreed
    return bool(agreed)


def interrupted() -> Interrupted:
    """The exception ending the run at the current step (after its checkpoint is written)."""
    stops = _active
    return Interrupted(stops.requested, stops.stage.index, stops.stage.step)


def _fault_point(world) -> None:
    """The test hook of mixerdistill.faults (only while a run handles stop signals)."""
    if _active is not None:
        _active.steps_done += 1
        faults.signal_point(world.rank, _active.steps_done)
