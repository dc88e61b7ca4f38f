"""One run per output directory: a second run into a directory in use is refused naming the holder; a
lock left by a killed run is detected, explained and taken over; the lock goes when the run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import REPO, cli_in_process, write_recipe
from mixerdistill.lock import LOCK_FILE

QUICK = ("--no-progress", "--set", "stages=[]", "--set", "eval.tokens=0")  # a run with nothing to train


def test_second_run_into_a_directory_in_use_is_refused_and_sigterm_stops_the_first(tmp_path):
    recipe = write_recipe(tmp_path, steps=400, every_steps=None, every_tokens=None)
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mixerdistill", "run", str(recipe), "--output", str(run), "--no-progress"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").is_file():  # the first run is training
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        for flags in ((), ("--resume",), ("--overwrite",)):
            code, text = cli_in_process("run", str(recipe), "--output", str(run), "--no-progress", *flags)
            text = " ".join(text.split())
            assert code == 2 and f"is in use by another run: pid {first.pid} on " in text, text
            assert time.strftime("started %Y-%m-%d", time.gmtime(holder["started"])) in text
        first.send_signal(signal.SIGTERM)
        _, log = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 143, log
    assert "interrupted at stage 1 step" in log and "--resume" in log
    assert not (run / LOCK_FILE).exists()


def test_stale_lock_of_a_killed_run_is_explained_and_taken_over(tmp_path):
    run = tmp_path / "run"
    script = (
        "import os, signal\n"
        "from mixerdistill.lock import output_lock\n"
        "class OneProcess:\n"  # mixerdistill.distributed.SINGLE, without importing torch
        "    main = True\n"
        "    def agree(self, flag): return flag\n"
        f"with output_lock({str(run)!r}, OneProcess()):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    assert holder.wait(timeout=300) == -signal.SIGKILL
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    code, text = cli_in_process("run", str(REPO / "recipes" / "tiny.yaml"), "--output", str(run), *QUICK)
    text = " ".join(text.split())
    assert code == 0, text
    assert f"was left by a run that is no longer running (pid {holder.pid} on " in text and "taking" in text
    assert not (run / LOCK_FILE).exists() and (run / "report.json").is_file()
