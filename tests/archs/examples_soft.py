"""Tiny examples of the soft-sharing and decoder-side architectures (8x8 images, batch 2)."""

from __future__ import annotations

import torch
from torch import nn

import polytask

from ._examples import Example, example


def _image(channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(2, channels, size, size)


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()
    )


def column() -> list[nn.Module]:
    return [conv(3, 4), conv(4, 4)]


@example("cross_stitch")
def _():
    model = polytask.archs.create(
        "cross_stitch",
        tasks=["seg", "depth"],
        stages=column(),
        heads=lambda t: nn.Conv2d(4, 3 if t == "seg" else 1, 1),
        channel_wise=True,
    )
    return Example(model, _image())


@example("sluice")
def _():
    # Three stages of one shape so that beta can mix all of them.
    model = polytask.archs.create(
        "sluice",
        tasks=["a", "b", "c"],
        stages=[conv(3, 4), conv(4, 4), conv(4, 4)],
        heads=nn.Conv2d(4, 2, 1),
        alpha_init="imbalanced",
    )
    return Example(model, _image())


@example("nddr")
def _():
    model = polytask.archs.create(
        "nddr", tasks=["a", "b"], stages=column(), heads=nn.Conv2d(4, 2, 1)
    )
    return Example(model, _image())


@example("nddr_shortcut")
def _():
    # The second stage halves the map: the shortcut resizes the first NDDR output.
    model = polytask.archs.create(
        "nddr_shortcut",
        tasks=["a", "b"],
        stages=[conv(3, 4), conv(4, 6, stride=2), conv(6, 6)],
        fuse_after=[0, 1],
        heads=nn.Conv2d(6, 2, 1),
    )
    return Example(model, _image())


@example("mtan")
def _():
    stages = [
        nn.Sequential(conv(3, 4), conv(4, 4)),
        nn.Sequential(conv(4, 6, stride=2), conv(6, 6)),
    ]
    model = polytask.archs.create("mtan", tasks=["a", "b"], stages=stages, heads=nn.Conv2d(6, 2, 1))
    return Example(model, _image())


@example("modulation")
def _():
    model = polytask.archs.create(
        "modulation", tasks=["a", "b"], stages=column(), heads=nn.Conv2d(4, 2, 1)
    )
    return Example(model, _image())


@example("ps_mcnn")
def _():
    model = polytask.archs.create(
        "ps_mcnn",
        tasks=["upper", "lower", "whole"],
        in_channels=3,
        task_channels=[2, 2],
        shared_channels=[4, 4],
        heads=nn.Sequential(nn.Flatten(), nn.Linear(6 * 2 * 2, 3)),
    )
    return Example(model, _image())


class TinyBackbone(nn.Module):
    """Two scales: 8x8 (4 channels) and 4x4 (6 channels) from an 8x8 image."""

    def __init__(self) -> None:
        super().__init__()
        self.fine = conv(3, 4)
        self.coarse = conv(4, 6, stride=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        fine = self.fine(x)
        return [fine, self.coarse(fine)]


# The initial 1x1 convs only produce the intermediate (deeply supervised) predictions, which
# the suite's losses on the final outputs do not read.
def _initial_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("initial.")}


@example("pad_net")
def _():
    model = polytask.archs.create(
        "pad_net",
        tasks=["seg", "depth"],
        backbone=conv(3, 4, stride=2),
        backbone_channels=4,
        out_channels={"seg": 3, "depth": 1},
        auxiliary={"normals": 3},
        channels=4,
    )
    return Example(model, _image(), unreached=_initial_names(model))


@example("mti_net")
def _():
    model = polytask.archs.create(
        "mti_net",
        tasks=["seg", "depth"],
        backbone=TinyBackbone(),
        backbone_channels=[4, 6],
        out_channels={"seg": 3, "depth": 1},
        auxiliary={"edges": 1},
        se_reduction=2,  # 3 hidden SE units: one (the default at 6 channels) can die on 2 images
    )
    return Example(model, _image(), unreached=_initial_names(model))


@example("pap")
def _():
    model = polytask.archs.create(
        "pap",
        tasks=["seg", "depth", "normals"],
        backbone=conv(3, 4, stride=2),
        backbone_channels=4,
        out_channels={"seg": 3, "depth": 1, "normals": 3},
        channels=4,
        beta=0.5,
        affinity_size=2,
    )
    return Example(model, _image(), unreached=_initial_names(model))
