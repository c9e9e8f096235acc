"""Balancing across the ranks of a ``torch.distributed`` process group (DDP, FSDP, plain).

``distribute(method, model)`` makes ``method.backward`` balance the global batch: each step
equals the single-process step on the concatenation of the ranks' batches. Without it, a
method refuses to run while a process group with several ranks is up (or call
``local(method)`` to balance each rank's batch on purpose). See ``docs/distributed.md``.
"""

from polytask.distributed.comm import Communicator
from polytask.distributed.sync import (
    PARAMS_STRATEGIES,
    DistributedSync,
    broadcast_parameters,
    distribute,
    local,
    rank_and_world,
)

__all__ = [
    "PARAMS_STRATEGIES",
    "Communicator",
    "DistributedSync",
    "broadcast_parameters",
    "distribute",
    "local",
    "rank_and_world",
]
