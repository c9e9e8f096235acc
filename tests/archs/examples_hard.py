"""Tiny examples of hard sharing and hierarchical MTL for the shared architecture suite."""

from __future__ import annotations

import torch
from torch import nn

import polytask

from ._examples import Example, example


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def _pool_head(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


@example("hard_sharing")
def _():
    # Three conv stages, the first two shared and the third copied per task; 8x8 images.
    stages = [_conv(3, 4), _conv(4, 4), _conv(4, 4)]
    heads = {"seg": nn.Conv2d(4, 3, 1), "cls": _pool_head(4, 2)}
    model = polytask.archs.create(
        "hard_sharing", tasks=["seg", "cls"], encoder=stages, heads=heads, split=2
    )
    return Example(model, torch.randn(2, 3, 8, 8))


class _Tanh(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


@example("hierarchical")
def _():
    # JMT-like: token embeddings, three stages with concatenated shortcuts, tasks at depths
    # 1, 2, 3 (the third stage is the top task's own); successive regularisation on, with a
    # snapshot taken so that aux_loss() is part of the suite's training step.
    emb, hid = 4, 5
    model = polytask.archs.create(
        "hierarchical",
        tasks=["pos", "chunk", "dep"],
        stages=[_Tanh(emb, hid), _Tanh(hid + emb, hid), _Tanh(hid + emb, hid)],
        heads=[nn.Linear(hid, 3), nn.Linear(hid, 4), nn.Linear(hid, 2)],
        depths={"pos": 1, "chunk": 2, "dep": 3},
        embedding=nn.Embedding(10, emb),
        shortcut="concat",
        successive_regularization=True,
    )
    model.snapshot("chunk")
    return Example(model, torch.randint(0, 10, (2, 6)))
