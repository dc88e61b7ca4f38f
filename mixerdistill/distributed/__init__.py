"""Several processes under torchrun; every ``torch.distributed`` call of mixerdistill is in this package.

- ``world``: this process's place among the ranks (``World``), joining and leaving the process group.
- ``plans``: how one stage is spread over the ranks — the ``Plan`` protocol and its four implementations
  (``SingleProcess``, ``DataParallel``, ``LayerParallel``, ``FullyShardedStage``), chosen by ``plan_for``.
- ``launcher``: ``mixerdistill run --nproc N`` starting N ranks with torchrun.

A run started without torchrun creates no process group and uses ``SingleProcess``, whose every method
is the identity: it behaves exactly as before distribution existed. docs/distributed.md has the user's view.
"""
