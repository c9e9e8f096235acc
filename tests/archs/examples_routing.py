"""Tiny examples of the routing and learned-branching architectures for the shared suite."""

from __future__ import annotations

import torch

from polytask.archs.routing import TaskRouting
from polytask.archs.routing_branching import LearnToBranch

from ._examples import Example, example


@example("task_routing")
def _() -> Example:
    return Example(TaskRouting(3, channels=(4, 6), sigma=0.5), torch.randn(2, 3, 6, 6))


@example("learn_to_branch")
def _() -> Example:
    return Example(LearnToBranch(3, in_features=4, hidden=(5, 6)), torch.randn(4, 4))
