"""Resume: a run interrupted anywhere continues to bitwise the same weights as an uninterrupted one.

In-process tests crash a run at chosen data positions (an exception from the batch iterator) or send
it SIGINT / SIGTERM / SIGUSR1 after a chosen step (mixerdistill.interrupt's test hook); the slow tests
SIGKILL a real `mixerdistill run` subprocess mid-stage and mid-checkpoint-write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, STAGES, cli_in_process, run_cli, write_recipe
from mixerdistill import faults
from mixerdistill.checkpoint import MANIFEST_FILE, STATE_FILE, StageProgress, is_complete
from mixerdistill.data import TokenData
from mixerdistill.errors import OutputError, UserError
from mixerdistill.faults import KILL_IN_CHECKPOINT
from mixerdistill.interrupt import Interrupted
from mixerdistill.recipe import load_recipe
from mixerdistill.run import execute

TIMING_FIELDS = {"tokens_per_second", "seconds"}


def final_weights(run: Path) -> bytes:
    return (run / "stage_3_knowledge_distillation" / "model.safetensors").read_bytes()


def metrics_without_timings(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def comparable_report(run: Path) -> dict:
    """report.json without what measures the machine (time, memory)."""
    report = json.loads((run / "report.json").read_text())
    for stage in report["stages"]:
        for field in ("seconds", "tokens_per_second", "peak_rss_gb"):
            stage.pop(field)
    report.pop("seconds")
    report.pop("peak_rss_gb")
    return report


class Crash(Exception):
    """Stands in for a process dying mid-stage."""


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted in-process run of the test recipe."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = load_recipe(write_recipe(folder))
    execute(recipe, folder / "run", show_progress=False)
    return folder / "run"


def crash_at(monkeypatch, stage: int, batches: int) -> None:
    """Make the ``stage``-th (1-based) call of train_batches raise Crash when batch ``batches`` + 1 is drawn."""
    original = TokenData.train_batches
    calls = []

    def train_batches(self, *args, **kwargs):
        calls.append(1)
        iterator = original(self, *args, **kwargs)
        if len(calls) != stage:
            return iterator

        def crashing():
            for drawn, batch in enumerate(iterator):
                if drawn == batches:
                    raise Crash(f"stage {stage}, after {batches} batches")
                yield batch

        return crashing()

    monkeypatch.setattr(TokenData, "train_batches", train_batches)


# (stage, batches drawn before the crash): a crash before the first checkpoint of a stage, right
# after one, between two, and in the last stage; 5 steps between checkpoints, 12 steps per stage.
KILL_POINTS = [(1, 3), (1, 7), (2, 5), (2, 11), (3, 10)]


@pytest.mark.parametrize("stage, batches", KILL_POINTS)
def test_crash_then_resume_gives_identical_weights(tmp_path, monkeypatch, keep_threads, reference, stage, batches):
    recipe = load_recipe(write_recipe(tmp_path))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        crash_at(patch, stage, batches)
        with pytest.raises(Crash):
            execute(recipe, run, show_progress=False)
    progress = StageProgress(run / "resume" / f"stage_{stage}_{STAGES[stage - 1]}").latest()
    assert (progress.step if progress else 0) == batches // 5 * 5
    execute(recipe, run, resume=True, show_progress=False)
    assert final_weights(run) == final_weights(reference)
    assert metrics_without_timings(run) == metrics_without_timings(reference)
    assert comparable_report(run) == comparable_report(reference)
    assert not (run / "resume").exists()  # progress checkpoints go once their stage is done


def test_crash_twice_then_resume(tmp_path, monkeypatch, keep_threads, reference, capsys):
    """A resumed run that is interrupted again still resumes to the same weights and figures."""
    recipe = load_recipe(write_recipe(tmp_path))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        crash_at(patch, 2, 7)  # stage 2 stops after 7 steps (checkpoint at 5)
        with pytest.raises(Crash):
            execute(recipe, run, show_progress=False)
    with monkeypatch.context() as patch:
        crash_at(patch, 1, 6)  # the resumed stage 2 runs steps 6-11 (checkpoint at 10) and stops
        with pytest.raises(Crash):
            execute(recipe, run, resume=True, show_progress=False)
    assert StageProgress(run / "resume" / "stage_2_hidden_state_alignment").latest().step == 10
    capsys.readouterr()
    execute(recipe, run, resume=True, show_progress=False)
    log = capsys.readouterr().err
    assert "stage 1 matrix_orientation: finished earlier" in log and "resuming after step 10" in log
    assert final_weights(run) == final_weights(reference)
    assert metrics_without_timings(run) == metrics_without_timings(reference)
    assert comparable_report(run) == comparable_report(reference)


def test_newest_complete_progress_checkpoint_wins(tmp_path, monkeypatch, keep_threads):
    recipe = load_recipe(write_recipe(tmp_path, every_steps=2))
    run = tmp_path / "run"
    crash_at(monkeypatch, 1, 9)
    with pytest.raises(Crash):
        execute(recipe, run, show_progress=False)
    root = run / "resume" / "stage_1_matrix_orientation"
    assert [p.name for p in root.iterdir()] == ["step_00000008"]  # older ones were deleted
    # A newer folder without a valid manifest (a half-written checkpoint) is skipped.
    fake = root / "step_00000010"
    fake.mkdir()
    (fake / MANIFEST_FILE).write_text('{"files": {"model.safetensors": "0"}, "step": 10}')
    assert StageProgress(root).latest().step == 8


def _start_run(recipe: Path, output: Path, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "mixerdistill", "run", str(recipe), "--output", str(output), "--no-progress"],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def subprocess_reference(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, uninterrupted run) for the subprocess tests: 60 steps per stage, a checkpoint every 5."""
    folder = tmp_path_factory.mktemp("subprocess")
    recipe = write_recipe(folder, steps=60, every_steps=5, threads=1, every_tokens=None)
    result = run_cli("run", str(recipe), "--output", str(folder / "reference"), "--no-progress")
    assert result.returncode == 0, result.stderr
    return recipe, folder / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sigkill_mid_stage_then_resume(tmp_path, subprocess_reference, stage):
    recipe, reference = subprocess_reference
    run = tmp_path / "run"
    process = _start_run(recipe, run)
    root = run / "resume" / f"stage_{stage}_{STAGES[stage - 1]}"
    deadline = time.monotonic() + 300
    while StageProgress(root).latest() is None:  # poll until the stage's first checkpoint is complete
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run / f"stage_{stage}_{STAGES[stage - 1]}").exists()  # killed mid-stage
    resumed = run_cli("run", str(recipe), "--output", str(run), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"stage {stage}" in resumed.stderr and "resuming after step" in resumed.stderr
    assert final_weights(run) == final_weights(reference)
    assert metrics_without_timings(run) == metrics_without_timings(reference)


@pytest.mark.slow
def test_sigkill_mid_checkpoint_write_then_resume(tmp_path, subprocess_reference):
    recipe, reference = subprocess_reference
    run = tmp_path / "run"
    # The 3rd checkpoint written is stage 1's at step 15: the process dies between writing its
    # files and its manifest, leaving a half-written `.step_00000015.tmp` folder.
    process = _start_run(recipe, run, env={KILL_IN_CHECKPOINT: "3"})
    process.wait(timeout=300)
    assert process.returncode == -signal.SIGKILL
    root = run / "resume" / "stage_1_matrix_orientation"
    assert sorted(p.name for p in root.iterdir()) == [".step_00000015.tmp", "step_00000010"]
    assert not is_complete(root / ".step_00000015.tmp")
    assert StageProgress(root).latest().step == 10
    resumed = run_cli("run", str(recipe), "--output", str(run), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after step 10" in resumed.stderr
    assert final_weights(run) == final_weights(reference)
    assert metrics_without_timings(run) == metrics_without_timings(reference)


def test_disk_full_while_checkpointing_then_resume(tmp_path, monkeypatch, keep_threads, reference):
    """ENOSPC from the writer of the 2nd checkpoint: a clear error, the 1st checkpoint intact, no
    temporary folder left, and --resume finishes with the same weights."""
    import mixerdistill.checkpoint as checkpoint

    recipe = load_recipe(write_recipe(tmp_path))
    run = tmp_path / "run"
    original, calls = checkpoint.save_model, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_model", full_disk)
        with pytest.raises(OutputError, match="No space left on device.*--resume"):
            execute(recipe, run, show_progress=False)
    root = run / "resume" / "stage_1_matrix_orientation"
    assert [p.name for p in root.iterdir()] == ["step_00000005"]
    execute(recipe, run, resume=True, show_progress=False)
    assert final_weights(run) == final_weights(reference)


def test_progress_state_is_loaded_without_unpickling_code(tmp_path, monkeypatch, keep_threads):
    """A state.pt carrying pickled code (with a manifest that matches it) is refused, not run."""
    import pickle

    recipe = load_recipe(write_recipe(tmp_path))
    run = tmp_path / "run"
    crash_at(monkeypatch, 1, 7)
    with pytest.raises(Crash):
        execute(recipe, run, show_progress=False)
    monkeypatch.undo()
    point = StageProgress(run / "resume" / "stage_1_matrix_orientation").latest()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (point.directory / STATE_FILE).write_bytes(pickle.dumps({"optimizer": Payload()}, protocol=2))
    manifest = json.loads((point.directory / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = hashlib.sha256((point.directory / STATE_FILE).read_bytes()).hexdigest()
    (point.directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="cannot be loaded safely"):
        execute(recipe, run, resume=True, show_progress=False)
    assert not marker.exists()


def assert_same_run(run: Path, reference: Path) -> None:
    assert final_weights(run) == final_weights(reference)
    assert metrics_without_timings(run) == metrics_without_timings(reference)
    assert comparable_report(run) == comparable_report(reference)
    assert not (run / "resume").exists()


# (optimizer steps done when the signal arrives, signal, the stage and step the run stops at): before a
# stage's first periodic checkpoint, in the last step of a stage (the stage finishes, its checkpoint
# is the resume point), mid stage 2 between periodic checkpoints (every 5 steps, 12 per stage).
STOP_POINTS = [(3, "SIGINT", 1, 3), (12, "SIGUSR1", 1, 12), (19, "SIGTERM", 2, 7)]


@pytest.mark.slow
@pytest.mark.parametrize("steps, name, stage, step", STOP_POINTS)
def test_signal_stops_after_the_step_with_a_checkpoint_and_resumes_identically(
    tmp_path, monkeypatch, keep_threads, reference, steps, name, stage, step
):
    recipe = load_recipe(write_recipe(tmp_path))
    run = tmp_path / "run"
    monkeypatch.setenv(faults.SEND_SIGNAL, f"0@{steps}:{name}")
    with pytest.raises(Interrupted) as stopped:
        execute(recipe, run, show_progress=False)
    assert (stopped.value.signum, stopped.value.stage, stopped.value.step) == (getattr(signal, name), stage, step)
    progress = StageProgress(run / "resume" / f"stage_{stage}_{STAGES[stage - 1]}").latest()
    if step < 12:
        assert progress.step == step  # the stop wrote a checkpoint of exactly that step
    else:
        assert progress is None and is_complete(run / f"stage_{stage}_{STAGES[stage - 1]}")
    assert len(metrics_without_timings(run)) == steps
    monkeypatch.delenv(faults.SEND_SIGNAL)
    execute(recipe, run, resume=True, show_progress=False)
    assert_same_run(run, reference)


def test_interrupted_run_prints_the_resume_command_and_exits_130(tmp_path, monkeypatch, keep_threads, reference):
    """Through the command line: SIGINT in stage 3 (step 10 of 12), exit 130, the printed command
    continues the run to the uninterrupted run's weights."""
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    monkeypatch.setenv(faults.SEND_SIGNAL, "0@34:SIGINT")
    code, text = cli_in_process("run", str(recipe), "--output", str(run), "--no-progress")
    assert code == 130, text
    assert "SIGINT: stopping after this step" in text
    expected = f"interrupted at stage 3 step 10 — continue with: mixerdistill run {recipe} --output {run} --resume"
    assert expected in " ".join(text.split())
    assert StageProgress(run / "resume" / "stage_3_knowledge_distillation").latest().step == 10
    monkeypatch.delenv(faults.SEND_SIGNAL)
    command = expected.split("continue with: ")[1].split()
    code, text = cli_in_process(*command[1:], "--no-progress")
    assert code == 0 and "resuming after step 10" in text, text
    assert_same_run(run, reference)


def test_second_signal_stops_at_once(tmp_path, monkeypatch, keep_threads, reference):
    """Two SIGTERMs after step 7: no checkpoint of step 7, exit 143; the run continues from step 5."""
    recipe = write_recipe(tmp_path)
    run = tmp_path / "run"
    monkeypatch.setenv(faults.SEND_SIGNAL, "0@7:SIGTERM,SIGTERM")
    code, text = cli_in_process("run", str(recipe), "--output", str(run), "--no-progress")
    assert code == 143, text
    assert "stopped at once by a second SIGTERM in stage 1" in " ".join(text.split())
    assert StageProgress(run / "resume" / "stage_1_matrix_orientation").latest().step == 5
    monkeypatch.delenv(faults.SEND_SIGNAL)
    execute(load_recipe(recipe), run, resume=True, show_progress=False)
    assert_same_run(run, reference)


def test_signal_outside_a_stage_stops_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM while the teacher loads (nothing to save yet): exit 143 and no output directory."""
    import mixerdistill.run as run_module

    original = run_module.load_teacher

    def load_teacher(spec):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(spec)

    monkeypatch.setattr(run_module, "load_teacher", load_teacher)
    code, text = cli_in_process("run", str(write_recipe(tmp_path)), "--output", str(tmp_path / "run"), "--no-progress")
    assert code == 143 and "interrupted by SIGTERM outside a stage" in text, text
    assert not (tmp_path / "run").exists()


def test_a_forked_child_ends_on_sigterm_as_by_default():
    """A forked child (a multiprocessing pool's worker: lm-eval's bootstrap) inherits the run's handlers; a
    SIGTERM must end it as by default, or the pool terminating it at the end of the evaluation waits for ever."""
    import multiprocessing

    from mixerdistill.interrupt import stop_signals

    with stop_signals():
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        time.sleep(0.5)
        child.terminate()  # SIGTERM, as Pool.terminate sends its workers
        child.join(timeout=20)
    assert child.exitcode == -signal.SIGTERM
