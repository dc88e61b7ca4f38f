"""Runs on several processes (torchrun, gloo, CPU): the same weights as one process with the same global
batch, layer-parallel stages 1–2, FSDP stage 3, a killed rank, a stop signal and resuming under torchrun.

Each multi-process run is `mixerdistill run --nproc 2` in a subprocess (two ranks with one thread each);
the reference is the same recipe run in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_sampling import IDENTITY, SETTINGS

from conftest import REPO, STAGES, cli_in_process, run_cli, tiny_llama, write_recipe
from mixerdistill import faults, interrupt
from mixerdistill.checkpoint import StageProgress
from mixerdistill.data import ByteTokenizer
from mixerdistill.distributed.plans import check_batch_sizes, shard_rows
from mixerdistill.distributed.world import SINGLE, World, choose_backend, start
from mixerdistill.errors import RecipeError, UserError
from mixerdistill.faults import KILL_RANK
from mixerdistill.recipe import DistributedSpec, load_recipe
from mixerdistill.run import execute
from mixerdistill.sampling import SampleSettings, generate_samples

STEPS = 4  # per stage: few, since Adam's normalisation amplifies rounding in parameters with tiny gradients
LAYER_PARALLEL_FSDP = ("--set", "distributed.layer_parallel=true", "--set", "distributed.strategy=fsdp")
CHILD_ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # one thread per rank; log lines unwrapped


def weights(run, stage: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"stage_{stage}_{STAGES[stage - 1]}" / "model.safetensors")


def largest_difference(run, reference, stage: int) -> float:
    ours, theirs = weights(run, stage), weights(reference, stage)
    assert ours.keys() == theirs.keys()
    return max((ours[name] - theirs[name]).abs().max().item() for name in ours)


def run_two_processes(recipe, output, *options, env=None):
    return run_cli(
        "run",
        str(recipe),
        "--output",
        str(output),
        "--no-progress",
        "--nproc",
        "2",
        *options,
        env={**CHILD_ENV, **(env or {})},
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(recipe, one-process run): 3 stages of 4 steps of 4 × 64 tokens, a checkpoint every 2 steps."""
    folder = tmp_path_factory.mktemp("distributed")
    recipe = write_recipe(folder, steps=STEPS, every_steps=2, threads=1, every_tokens=512)
    threads = torch.get_num_threads()
    try:
        execute(load_recipe(recipe), folder / "single", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return recipe, folder / "single"


def test_two_processes_give_the_single_process_weights(single, tmp_path):
    recipe, reference = single
    result = run_two_processes(recipe, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "data parallel over 2 processes" in result.stderr
    for stage in (1, 2, 3):
        assert largest_difference(tmp_path / "run", reference, stage) < 1e-5
    # Rank 0 alone logs and writes: one metrics line per step, one report.
    assert result.stdout.count("# Run report") == 1
    assert result.stderr.count("teacher: loading") == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((reference / "metrics.jsonl").read_text().splitlines()) == 3 * STEPS


def test_layer_parallel_and_fsdp_give_the_single_process_weights(single, tmp_path):
    """Stages 1–2 layer-parallel (one layer per rank), stage 3 fully sharded."""
    recipe, reference = single
    result = run_two_processes(recipe, tmp_path / "run", *LAYER_PARALLEL_FSDP)
    assert result.returncode == 0, result.stderr
    assert "layer parallel over 2 processes" in result.stderr
    assert "fully sharded (FSDP) over 2 processes" in result.stderr
    # The clipping norm is summed per rank, then across ranks: another order of float additions, which
    # Adam amplifies in parameters with tiny gradients (stages 1–2 measured 1e-7 … 1.3e-6 apart).
    for stage in (1, 2, 3):
        assert largest_difference(tmp_path / "run", reference, stage) < 1e-5


@pytest.mark.parametrize(
    "options, kill_after",
    [
        ((), 7),  # data parallel: rank 1 dies in stage 2 after step 3 (checkpoint at step 2)
        (LAYER_PARALLEL_FSDP, 11),  # fsdp: rank 1 dies in stage 3 after step 3 (checkpoint at step 2)
    ],
    ids=["ddp", "fsdp"],
)
def test_killed_rank_stops_the_run_and_it_resumes(single, tmp_path, options, kill_after):
    recipe, reference = single
    run = tmp_path / "run"
    killed = run_two_processes(recipe, run, *options, env={KILL_RANK: f"1@{kill_after}"})
    assert killed.returncode == 2
    assert "rank 1 of 2 was killed by SIGKILL" in killed.stderr
    stage = (kill_after - 1) // STEPS + 1
    assert not (run / f"stage_{stage}_{STAGES[stage - 1]}").exists()
    resume_command = killed.stderr.split("continue with")[1].split()
    assert resume_command[:2] == ["mixerdistill", "run"] and "--resume" in resume_command
    resumed = run_cli(*resume_command[1:], "--no-progress", env=CHILD_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stage {stage} {STAGES[stage - 1]}: resuming after step 2" in resumed.stderr
    assert largest_difference(run, reference, 3) < 1e-5


@pytest.fixture(scope="module")
def two_processes(single, tmp_path_factory):
    """An uninterrupted data-parallel run on two processes of the same recipe."""
    output = tmp_path_factory.mktemp("two_processes") / "run"
    result = run_two_processes(single[0], output)
    assert result.returncode == 0, result.stderr
    return output


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, name, stage, step",
    [
        ("1@3", "SIGTERM", 1, 3),  # rank 1 alone gets it, between two periodic checkpoints (every 2 steps)
        ("0@6", "SIGUSR1", 2, 2),  # rank 0 alone, on a periodic checkpoint's step
    ],
)
def test_signal_on_one_rank_stops_every_rank_at_that_step(single, two_processes, tmp_path, target, name, stage, step):
    recipe, _ = single
    run = tmp_path / "run"
    stopped = run_two_processes(recipe, run, env={faults.SEND_SIGNAL: f"{target}:{name}"})
    assert stopped.returncode == interrupt.exit_code(getattr(signal, name)), stopped.stderr
    line = " ".join(stopped.stderr.split())
    assert line.count(f"interrupted at stage {stage} step {step} — continue with: mixerdistill run") == 1
    assert StageProgress(run / "resume" / f"stage_{stage}_{STAGES[stage - 1]}").latest().step == step
    command = line.split("continue with: ")[1].split(" --resume")[0].split() + ["--resume", "--nproc", "2"]
    assert line.split("continue with: ")[1].startswith(" ".join(command))
    resumed = run_cli(*command[1:], "--no-progress", env=CHILD_ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"stage {stage} {STAGES[stage - 1]}: resuming after step {step}" in resumed.stderr
    for number in (1, 2, 3):
        final = f"stage_{number}_{STAGES[number - 1]}/model.safetensors"
        assert (run / final).read_bytes() == (two_processes / final).read_bytes()


def test_global_batch_is_split_into_disjoint_slices():
    batch = torch.arange(24).view(8, 3)
    slices = [shard_rows(batch, World(rank, 4, rank)) for rank in range(4)]
    assert all(s.shape == (2, 3) for s in slices)
    assert torch.equal(torch.cat(slices), batch)  # the union, in order, is the single-process batch
    assert torch.equal(shard_rows(batch, SINGLE), batch)


def test_batch_size_must_split_over_the_processes(single):
    recipe = load_recipe(single[0], ["stages.1.batch_size=3"])
    with pytest.raises(RecipeError) as caught:
        check_batch_sizes(recipe, World(0, 2))
    assert [path for path, _ in caught.value.problems] == ["stages.1.batch_size"]
    assert "multiple of 2" in str(caught.value)
    layer_parallel = load_recipe(single[0], ["stages.1.batch_size=3", "distributed.layer_parallel=true"])
    check_batch_sizes(layer_parallel, World(0, 2))  # stage 2 is layer-local: every rank sees the whole batch


def test_one_process_creates_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = start(DistributedSpec(), torch.device("cpu"))
    assert world is SINGLE and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_backend_follows_the_device():
    assert choose_backend("auto", torch.device("cpu")) == "gloo"
    assert choose_backend("auto", torch.device("cuda", 0)) == "nccl"
    with pytest.raises(UserError, match="nccl needs CUDA"):
        choose_backend("nccl", torch.device("cpu"))


def test_nproc_refuses_to_nest_under_torchrun(single, monkeypatch):
    monkeypatch.setitem(os.environ, "WORLD_SIZE", "2")
    code, text = cli_in_process("run", str(single[0]), "--nproc", "2")
    assert code == 2 and "already runs under torchrun" in text


def test_distributed_block_is_validated(single):
    with pytest.raises(RecipeError) as caught:
        load_recipe(single[0], ["distributed.strategy=zero3"])
    assert caught.value.problems[0][0] == "distributed.strategy"


SAMPLING_RANK = """
    import json, sys
    from pathlib import Path

    import torch
    from conftest import tiny_llama
    from test_sampling import IDENTITY, SETTINGS, CountingTeacher
    from mixerdistill.data import ByteTokenizer
    from mixerdistill.distributed.world import start, stop
    from mixerdistill.recipe import DistributedSpec
    from mixerdistill.sampling import SampleSettings, generate_samples

    world, _ = start(DistributedSpec(), torch.device("cpu"))
    teacher = CountingTeacher(tiny_llama())
    samples, _ = generate_samples(teacher, ByteTokenizer(), SampleSettings(**SETTINGS), IDENTITY, show_progress=False)
    Path(sys.argv[1], f"rank_{world.rank}.json").write_text(json.dumps({"calls": teacher.calls, "samples": samples}))
    stop(world)
"""


def test_rank_zero_alone_samples_the_teacher(tmp_path, monkeypatch):
    """Two gloo ranks ask for the same teacher samples: rank 0 makes them, rank 1 reads them from the cache."""
    script = tmp_path / "sampling_rank.py"
    script.write_text(textwrap.dedent(SAMPLING_RANK))
    environment = {**os.environ, **CHILD_ENV, "MIXERDISTILL_CACHE": str(tmp_path / "cache")}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), environment.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run(
        [*command, str(script), str(tmp_path)], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("teacher samples: kept") == 1  # rank 0 alone reports
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["calls"] == 2 * SETTINGS["max_new_tokens"] + 1 and ranks[1]["calls"] == 0  # +1: throughput
    monkeypatch.setenv("MIXERDISTILL_CACHE", str(tmp_path / "one_process"))
    alone, _ = generate_samples(tiny_llama(), ByteTokenizer(), SampleSettings(**SETTINGS), IDENTITY, False)
    assert ranks[0]["samples"] == ranks[1]["samples"] == alone
