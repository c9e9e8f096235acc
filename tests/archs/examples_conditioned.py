"""Tiny examples of the task-conditioned architectures (TSN, ASTMT, RCM): 8x8 images, batch 2."""

from __future__ import annotations

import torch
from torch import nn

import polytask

from ._examples import Example, example


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()
    )


def image() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


@example("task_switching")
def _() -> Example:
    # Learned codes, so that the suite's per-task checks have task parameters to look at;
    # the shared head's 3 channels are pooled to 1 for "depth" as the official code does.
    decoder = [nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 4, 3, padding=1))]
    model = polytask.archs.create(
        "task_switching",
        tasks=["seg", "depth"],
        encoder=conv(3, 4, stride=2),
        decoder=decoder,
        head=nn.Conv2d(4, 3, 1),
        out_channels={"depth": 1},
        code="learned",
        code_width=2,
        mapping_layers=2,
    )
    return Example(model, image())


@example("astmt")
def _() -> Example:
    model = polytask.archs.create(
        "astmt",
        tasks=["seg", "depth", "edge"],
        stages=[conv(3, 6), conv(6, 6, stride=2)],
        heads=nn.Conv2d(6, 2, 1),
        reduction=2,
    )
    # The discriminator learns only from discriminator_loss (on the task gradients), which the
    # suite's plain forward/backward does not call; tests/archs/test_conditioned.py trains it.
    unreached = {f"discriminator.{n}" for n, _ in model.discriminator.named_parameters()}
    return Example(model, image(), unreached=unreached)


@example("rcm")
def _() -> Example:
    model = polytask.archs.create(
        "rcm",
        tasks=["seg", "depth"],
        backbone=nn.Sequential(conv(3, 4), conv(4, 4, stride=2)),
        heads=nn.Conv2d(4, 2, 1),
    )
    return Example(model, image())
