"""Tiny examples of the expert architectures (feature-vector inputs, 3 examples, 2 tasks)."""

from __future__ import annotations

import torch
from torch import nn

import polytask

from ._examples import Example, example

X = 5  # input features


def _x() -> torch.Tensor:
    return torch.randn(4, X)


@example("shared_bottom")
def _():
    model = polytask.archs.create(
        "shared_bottom", tasks=["a", "b"], in_features=X, bottom=[6, 4], tower=[3]
    )
    return Example(model, _x())


@example("omoe")
def _():
    model = polytask.archs.create(
        "omoe", tasks=["a", "b"], in_features=X, num_experts=3, expert=[4], tower=[3]
    )
    return Example(model, _x())


@example("mmoe")
def _():
    # A factory expert and a factory tower with per-task outputs: any module may serve.
    model = polytask.archs.create(
        "mmoe",
        tasks=["a", "b"],
        in_features=X,
        num_experts=3,
        expert=lambda n: nn.Sequential(nn.Linear(n, 4), nn.Tanh()),
        expert_features=4,
        tower=lambda task, n: nn.Linear(n, 2 if task == "a" else 1),
    )
    return Example(model, _x())


@example("cgc")
def _():
    model = polytask.archs.create(
        "cgc", tasks=["a", "b"], in_features=X, num_shared=2, num_specific=1, expert=[8], tower=[3]
    )
    return Example(model, _x())


@example("ple")
def _():
    model = polytask.archs.create(
        "ple",
        tasks=["a", "b", "c"],
        in_features=X,
        num_shared=2,
        num_specific={"a": 1, "b": 2, "c": 1},
        # Smooth experts: with ReLU ones some unit of a 3-level stack is dead on a tiny batch.
        expert=lambda n: nn.Sequential(nn.Linear(n, 4), nn.Tanh()),
        expert_features=4,
        tower=[3],
        num_levels=3,
    )
    return Example(model, _x())


@example("dselect_k")
def _():
    # 3 experts (not a power of 2: the reachability term of aux_loss is active).
    model = polytask.archs.create(
        "dselect_k", tasks=["a", "b"], in_features=X, num_experts=3, k=2, expert=[4], tower=[3]
    )
    return Example(model, _x())
