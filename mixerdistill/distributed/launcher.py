"""``mixerdistill run --nproc N``: start N ranks of this command on this machine with torchrun."""

from __future__ import annotations

import os
import shlex

from mixerdistill.errors import UserError


class RankFailed(UserError):
    """A rank of a run started with ``--nproc`` died; torchrun stopped the others."""


def launch(nproc: int, arguments: list[str], resume_command: list[str]) -> None:
    """Run ``python -m mixerdistill ARGUMENTS`` as ``nproc`` ranks on this machine with torchrun
    (torch.distributed.run, in this process). When a rank fails, torchrun stops the others and this
    raises RankFailed naming the rank, how it ended and ``resume_command``."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from mixerdistill.interrupt import (
        RESUME_COMMAND_VARIABLE,
        STOP_SIGNALS,
        STOP_TIMEOUT_SECONDS,
        exit_code,
        stop_exit_codes,
    )
    from mixerdistill.plugins import get_manager

    saved_environment = dict(os.environ)  # the variables set below are for the ranks, not for this process after
    get_manager().pin_for_child_processes()  # every rank loads the plugins this run started with
    # torchrun forwards a stop signal to every rank (they end their step and write a checkpoint) and
    # waits STOP_TIMEOUT_SECONDS for them; rank 0 prints the resume command, which is this one.
    forwarded = ",".join(dict.fromkeys([s.name for s in STOP_SIGNALS] + ["SIGHUP", "SIGQUIT"]))
    options = get_args_parser().parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--signals-to-handle={forwarded}",
            f"--shutdown-timeout={STOP_TIMEOUT_SECONDS}",
            "--module",
            "mixerdistill",
            *arguments,
        ]
    )
    os.environ[RESUME_COMMAND_VARIABLE] = shlex.join(resume_command)
    try:
        run(options)
    except SignalException as error:  # this launcher got the signal; the ranks have stopped
        raise SystemExit(exit_code(error.sigval)) from None
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode in stop_exit_codes():  # the ranks stopped on a signal; rank 0 printed how to continue
            raise SystemExit(failure.exitcode) from None
        if failure.exitcode < 0:
            how = f"was killed by {failure.signal_name()}"
        else:
            how = f"exited with code {failure.exitcode}" + (
                " (its error is printed above)" if failure.exitcode == 2 else ""
            )
        raise RankFailed(
            f"rank {rank} of {nproc} {how}; torchrun stopped the other ranks. Checkpoints written "
            f"so far are intact: once the cause is fixed, continue with\n  "
            f"{shlex.join(resume_command)}"
        ) from None
    finally:
        os.environ.clear()
        os.environ.update(saved_environment)
