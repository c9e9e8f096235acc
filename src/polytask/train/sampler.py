"""A batch sampler whose position is part of the checkpoint, for exact mid-epoch resume."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices of a map-style data set; epoch e's order is a permutation drawn
    from a generator seeded with (seed, e), so it does not depend on what ran before, and
    :meth:`state_dict` records how many batches of the current epoch were already yielded.

    Args:
        num_samples: the data set's length.
        batch_size: samples per batch.
        shuffle: a fresh permutation each epoch (else the natural order).
        seed: the base seed of the permutations.
        drop_last: drop the last incomplete batch.
        rank, world_size: under DDP each rank takes every ``world_size``-th sample of the
            epoch's order (the padding question is left to the caller: with ``drop_last`` the
            epoch is cut to a multiple of ``world_size * batch_size``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be positive (the data set is empty)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be a positive integer")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # batches of `epoch` already yielded

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            usable = len(order) // (self.batch_size * self.world_size)
            order = order[: usable * self.batch_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        start = self.position
        for i in range(start, len(batches)):
            self.position = i + 1
            yield batches[i]
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint sampler seed {state['seed']} differs from this run's seed "
                f"{self.seed}; resume with the same seed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
