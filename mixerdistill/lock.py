"""One run per output directory: an exclusive lock held from before the directory is checked until the
process ends.

The lock is ``DIR/run.lock``, locked with ``flock`` and holding the holder's pid, host, start time and
command. The kernel drops an ``flock`` when its process ends in any way (even SIGKILL), so a lock file
whose lock is free but whose content names a holder was left by a process that died: it is stale, and
the next run says so and takes the directory over. A run that finds the lock held exits with code 2
naming the holder. On a clean exit the file is removed, and so is the directory if the run created it
and wrote nothing else (a run that fails early leaves nothing behind).

Under torchrun rank 0 alone takes the lock; every rank learns whether it got it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixerdistill.console import stderr_console
from mixerdistill.errors import UserError, writing

LOCK_FILE = "run.lock"


class OutputLocked(UserError):
    """Another live run holds the output directory."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}"


def _read_holder(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {"pid": "?", "note": "unreadable lock file"}


def _acquire(output: Path):
    """Open and lock ``output/run.lock`` (created with ``output`` if missing); returns the open file, or
    raises OutputLocked naming the holder."""
    path = output / LOCK_FILE
    while True:
        with writing(output):
            output.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 (held open, and locked, for the whole run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if not isinstance(error, BlockingIOError):  # e.g. a network file system without locks
                stderr_console.print(
                    f"[yellow]warning:[/] cannot lock {path} ({error.strerror}): nothing stops "
                    f"a second run from writing into {output}",
                    highlight=False,
                    soft_wrap=True,
                )
                return handle
            holder = _read_holder(handle)
            handle.close()
            command = f" (`{holder['command']}`)" if holder.get("command") else ""
            raise OutputLocked(
                f"output directory {output} is in use by another run: {_describe(holder)}{command}. "
                f"Wait for it to end, or stop it (kill -TERM {holder.get('pid', 'PID')} writes a "
                f"checkpoint) and continue it with --resume; or choose another --output"
            ) from None
        # The file may have been removed by its previous holder between our open and our flock.
        if path.exists() and os.path.samestat(os.fstat(handle.fileno()), path.stat()):
            return handle
        handle.close()


@contextmanager
def output_lock(output: Path, world) -> Iterator[None]:
    """Hold the lock of ``output`` for the duration of the block (rank 0; see the module docstring)."""
    output = Path(output)
    created = not output.exists()
    handle, problem = None, None
    if world.main:
        try:
            handle = _acquire(output)
        except UserError as error:
            problem = error
    if not world.agree(problem is None):
        raise problem or OutputLocked(f"output directory {output} is in use by another run (see rank 0's message)")
    try:
        if handle is not None:
            stale = _read_holder(handle)
            if stale:
                stderr_console.print(
                    f"[yellow]warning:[/] {output / LOCK_FILE} was left by a run that is no longer "
                    f"running ({_describe(stale)}; killed, or its machine went down): taking the "
                    f"directory over",
                    highlight=False,
                    soft_wrap=True,
                )
            handle.seek(0)
            handle.truncate()
            handle.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "started": time.time(),
                        "command": shlex.join(["mixerdistill", *sys.argv[1:]]),
                    }
                )
                + "\n"
            )
            handle.flush()
        yield
    finally:
        if handle is not None:
            _release(output, handle, created)


def _release(output: Path, handle, created: bool) -> None:
    """Remove the lock file (then unlock), and the directory if this run created it and left it empty."""
    try:
        (output / LOCK_FILE).unlink(missing_ok=True)
        if created and not any(output.iterdir()):
            output.rmdir()
    except OSError:
        pass  # the directory went away or became unwritable: the lock goes with the process anyway
    handle.close()


def clear_directory(output: Path) -> None:
    """Delete everything in ``output`` but its lock (``--overwrite``)."""
    import shutil

    for entry in Path(output).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_files(output: Path) -> list[Path]:
    """What ``output`` holds apart from its lock."""
    return [entry for entry in Path(output).iterdir() if entry.name != LOCK_FILE]
