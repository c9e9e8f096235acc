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
        rank, world_size: with several ranks ``batch_size`` is the global batch: each
            global batch of the epoch's order is split into ``world_size`` consecutive parts
            as equal as possible (sizes differ by at most one), and rank r takes part r, so
            the ranks' batches concatenated in rank order are the single-process batch.
            Nothing is padded or duplicated (polytask.distributed weights each rank by its
            count); a last global batch with fewer samples than ranks is dropped (at most
            ``world_size - 1`` samples an epoch), since a rank cannot take an empty step.
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
            return torch.randperm(self.num_samples, generator=g).tolist()
        return list(range(self.num_samples))

    def _sizes(self) -> list[int]:
        """The global batch sizes of an epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        sizes = [self.batch_size] * full
        if rest and not self.drop_last and rest >= self.world_size:
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        return len(self._sizes())

    def _part(self, batch: list[int]) -> list[int]:
        q, r = divmod(len(batch), self.world_size)
        start = self.rank * q + min(self.rank, r)
        return batch[start : start + q + (self.rank < r)]

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        batches = []
        offset = 0
        for size in self._sizes():
            batches.append(self._part(order[offset : offset + size]))
            offset += size
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
