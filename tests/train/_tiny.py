"""A tiny two-task problem for the trainer tests: a regression and a classification task."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from polytask.archs import MultiTaskModel
from polytask.tasks import Task, TaskSet, losses, metrics


class TwoTaskData(Dataset):
    def __init__(self, n: int, seed: int, *, missing_b: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        w = torch.randn(6, generator=g)
        self.reg = self.x @ w + 0.1 * torch.randn(n, generator=g)
        self.cls = (self.x[:, 0] + self.x[:, 1] > 0).long()
        if missing_b:
            self.cls[:] = -1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"reg": self.reg[i], "cls": self.cls[i]}


class TinyNet(MultiTaskModel):
    """Encoder with dropout (so RNG state matters) and two heads."""

    paper = "test model"
    has_shared_representation = True

    def __init__(self) -> None:
        super().__init__(["reg", "cls"])
        self.encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({"reg": nn.Linear(16, 1), "cls": nn.Linear(16, 2)})

    def encode(self, x):
        return self.encoder(x)

    def decode(self, features, task=None):
        out = {"reg": self.heads["reg"](features).squeeze(-1), "cls": self.heads["cls"](features)}
        return self._select(out, task)

    def forward(self, x, task=None):
        return self.decode(self.encode(x), task)

    def task_parameters(self, task):
        return iter(self.heads[self.check_task(task)].parameters())


def tiny_tasks() -> TaskSet:
    return TaskSet(
        [
            Task("reg", losses.mse, [lambda: metrics.MeanError("mae")]),
            Task("cls", losses.cross_entropy, [lambda: metrics.Accuracy(2)]),
        ]
    )
