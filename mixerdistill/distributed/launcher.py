"""``mixerdistill run --nproc N``: start N ranks of this command on this machine with torchrun."""

from __future__ import annotations

import shlex

from mixerdistill.errors import UserError


class RankFailed(UserError):
    """A rank of a run started with ``--nproc`` died; torchrun stopped the others."""


def launch(nproc: int, arguments: list[str], resume_command: list[str]) -> None:
    """Run ``python -m mixerdistill ARGUMENTS`` as ``nproc`` ranks on this machine with torchrun
    (torch.distributed.run, in this process). When a rank fails, torchrun stops the others and this
    raises RankFailed naming the rank, how it ended and ``resume_command``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from mixerdistill.plugins import get_manager

    get_manager().pin_for_child_processes()  # every rank loads the plugins this run started with
    options = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module",
                                            "mixerdistill", *arguments])
    try:
        run(options)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode < 0:
            how = f"was killed by {failure.signal_name()}"
        else:
            how = f"exited with code {failure.exitcode}" + (" (its error is printed above)" if failure.exitcode == 2
                                                            else "")
        raise RankFailed(f"rank {rank} of {nproc} {how}; torchrun stopped the other ranks. Checkpoints written "
                         f"so far are intact: once the cause is fixed, continue with\n  "
                         f"{shlex.join(resume_command)}") from None
