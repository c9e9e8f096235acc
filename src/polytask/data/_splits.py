"""Shared pieces of the benchmark loaders: seeded disjoint splits, subsets, tensor datasets."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["SPLITS", "TaskTensors", "check_options", "disjoint_splits", "subset_sizes"]

SPLITS = ("train", "val", "test")


def check_options(benchmark: str, options: Mapping[str, object], allowed: Iterable[str]) -> None:
    """Raise a ``ValueError`` naming any option the loader of ``benchmark`` does not accept."""
    allowed = sorted(allowed)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {benchmark} option(s) {unknown}; it accepts {allowed}")


def subset_sizes(sizes: Mapping[str, int], subset: int | None) -> dict[str, int]:
    """Split sizes for a budget of ``subset`` training examples: every split is shrunk by the
    factor ``subset / sizes["train"]`` (at least one example each), so validation and test
    keep their ratio to training. ``None`` keeps ``sizes``."""
    if subset is None:
        return dict(sizes)
    if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
        raise ValueError(f"subset={subset!r} must be a positive number of training examples")
    if subset > sizes["train"]:
        raise ValueError(
            f"subset={subset} exceeds the {sizes['train']} training examples; use a smaller "
            "subset or None for all of them"
        )
    factor = subset / sizes["train"]
    return {
        split: subset if split == "train" else max(1, math.ceil(n * factor))
        for split, n in sizes.items()
    }


def disjoint_splits(n: int, sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets of ``range(n)`` with the given sizes, from one permutation drawn
    with ``numpy.random.default_rng(seed)`` (the same ``seed`` gives the same splits)."""
    total = sum(sizes.values())
    if total > n:
        raise ValueError(f"the splits {dict(sizes)} need {total} items but there are only {n}")
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for split, size in sizes.items():
        out[split] = order[start : start + size]
        start += size
    return out


class TaskTensors(Dataset):
    """A split held as tensors: item ``i`` is ``(inputs[i], {task: targets[task][i]})``.

    ``inputs`` is one tensor or a dict of tensors (then item ``i`` is the dict of their
    ``i``-th rows, which the default ``DataLoader`` collation stacks per key). ``source``
    records where each item comes from in the source data (row or record numbers), so
    that splits can be checked for overlap.
    """

    def __init__(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        targets: Mapping[str, Tensor],
        source: np.ndarray | None = None,
    ) -> None:
        tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
        tensors += list(targets.values())
        lengths = {len(t) for t in tensors}
        if len(lengths) != 1:
            raise ValueError(f"inputs and targets must have one length, got lengths {lengths}")
        self.inputs = dict(inputs) if isinstance(inputs, Mapping) else inputs
        self.targets = dict(targets)
        self.length = lengths.pop()
        if source is not None and len(source) != self.length:
            raise ValueError(f"source has {len(source)} entries for {self.length} items")
        self.source = source

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        if isinstance(self.inputs, dict):
            x: Tensor | dict[str, Tensor] = {k: v[i] for k, v in self.inputs.items()}
        else:
            x = self.inputs[i]
        return x, {task: y[i] for task, y in self.targets.items()}
