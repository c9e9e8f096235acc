"""The collectives polytask's distributed balancing uses, with their payload recorded.

Every collective goes through one :class:`Communicator`, which appends ``(operation,
elements)`` to :attr:`Communicator.log` (the most recent ones: a training run does not grow
it), so the communication volume of a step is observable (the tests check it against the
documented one, see ``docs/distributed.md``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator"]


@dataclass
class Communicator:
    """The process group a method balances over, and a log of what was sent.

    Args:
        group: the process group (``None``: the default group).
    """

    group: Any = None
    #: ``(operation, number of elements)`` of the last 256 collectives since ``clear()``.
    log: deque[tuple[str, int]] = field(default_factory=lambda: deque(maxlen=256))

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def clear(self) -> None:
        self.log.clear()

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        self.log.append(("all_reduce", tensor.numel()))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def reduce_scatter(self, tensor: Tensor) -> Tensor:
        """Sum the flat ``tensor`` (length divisible by the world size) over the ranks and
        return this rank's contiguous shard of the sum."""
        shard = tensor.new_empty(tensor.numel() // self.world_size)
        self.log.append(("reduce_scatter", tensor.numel()))
        dist.reduce_scatter_tensor(shard, tensor.contiguous(), group=self.group)
        return shard

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate the flat ``tensor`` of every rank (same length on each), in rank order."""
        out = tensor.new_empty(tensor.numel() * self.world_size)
        self.log.append(("all_gather", tensor.numel()))
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=self.group)
        return out

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` with rank ``src``'s copy (``src`` is a rank of the group)."""
        self.log.append(("broadcast", tensor.numel()))
        global_src = dist.get_global_rank(self.group, src) if self.group else src
        dist.broadcast(tensor, src=global_src, group=self.group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s copy of a picklable object (used once, at set-up)."""
        box = [obj]
        self.log.append(("broadcast_object", 1))
        global_src = dist.get_global_rank(self.group, src) if self.group else src
        dist.broadcast_object_list(box, src=global_src, group=self.group)
        return box[0]
