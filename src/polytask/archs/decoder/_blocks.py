"""Blocks of the decoder-side (distillation) architectures: residual blocks, squeeze-and-
excitation, and the multi-modal distillation unit of PAD-Net (reused by MTI-Net)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "MultiModalDistillation", "SEBlock", "refinement"]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN with a residual (1x1 conv-BN when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def refinement(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two basic blocks, ``in -> out -> out`` (the reference code's per-task refinement)."""
    return nn.Sequential(
        BasicBlock(in_channels, out_channels), BasicBlock(out_channels, out_channels)
    )


class SEBlock(nn.Module):
    """Squeeze-and-excitation: ``x ⊙ σ(W2 ReLU(W1 mean_hw(x)))`` with reduction ``r``."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)  # at least one unit for narrow features
        self.squeeze = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        scale = self.squeeze(x.mean(dim=(2, 3)))
        return x * scale[:, :, None, None]


class MultiModalDistillation(nn.Module):
    """Attention-guided message passing between task features (PAD-Net's distillation).

    ``F_t^o = F_t + Σ_{s ≠ t} σ(G_ts ⊛ F_g) ⊙ (W_ts ⊛ F_s)`` for every target t, with 3x3
    convs ``W_ts`` (the message from s to t) and ``G_ts`` (its attention gate), where the
    gate reads the receiving task's features (``gate="target"``, F_g = F_t, the PAD-Net
    paper's attention-guided unit) or the sending task's (``gate="source"``, F_g = F_s, the
    spatial self-attention block of the Vandenhende et al. PAD-Net/MTI-Net code).

    Args:
        targets: tasks that receive messages (the final tasks).
        sources: tasks whose features are sent (final and auxiliary tasks).
        channels: the width of every task's features.
    """

    def __init__(
        self, targets: Sequence[str], sources: Sequence[str], channels: int, gate: str
    ) -> None:
        super().__init__()
        if gate not in ("target", "source"):
            raise ValueError(f"gate={gate!r}; use 'target' or 'source'")
        self.targets, self.sources, self.gate = tuple(targets), tuple(sources), gate
        self.message = nn.ModuleDict()
        self.attention = nn.ModuleDict()
        for t in self.targets:
            others = [s for s in self.sources if s != t]
            self.message[t] = nn.ModuleDict(
                {s: nn.Conv2d(channels, channels, 3, padding=1, bias=False) for s in others}
            )
            self.attention[t] = nn.ModuleDict(
                {s: nn.Conv2d(channels, channels, 3, padding=1, bias=False) for s in others}
            )

    def forward(
        self, features: Mapping[str, Tensor], targets: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        out = {}
        for t in self.targets if targets is None else targets:
            y = features[t]
            for s, conv in self.message[t].items():
                g = features[t] if self.gate == "target" else features[s]
                y = y + torch.sigmoid(self.attention[t][s](g)) * conv(features[s])
            out[t] = y
        return out
