"""Argument checks and helpers shared by the decoder-side architectures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["KeepsIntermediate", "check_outputs", "fuse_scales", "upsample_to"]


class KeepsIntermediate(nn.Module):
    """Base of models that keep their last forward's intermediate predictions in
    ``last_intermediate``: those tensors hold the autograd graph, so they are left out of
    copies and pickles (``copy.deepcopy(model)`` and ``torch.save(model)`` work after a
    forward)."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["last_intermediate"] = {}
        return state


def check_outputs(
    tasks: Sequence[str],
    out_channels: Mapping[str, int] | int,
    auxiliary: Mapping[str, int] | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """``({task: channels}, {auxiliary task: channels})`` validated."""
    if isinstance(out_channels, int) and not isinstance(out_channels, bool):
        outputs = {t: out_channels for t in tasks}
    elif isinstance(out_channels, Mapping):
        if set(out_channels) != set(tasks):
            raise ValueError(
                f"out_channels must have one entry per task {list(tasks)}; "
                f"got keys {list(out_channels)}"
            )
        outputs = {t: out_channels[t] for t in tasks}
    else:
        raise TypeError(f"out_channels must be an int or {{task: int}}, got {out_channels!r}")
    aux = dict(auxiliary or {})
    clash = sorted(set(aux) & set(tasks))
    if clash:
        raise ValueError(f"auxiliary tasks {clash} are also final tasks; name them differently")
    for name, c in {**outputs, **aux}.items():
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"output channels of {name!r} must be a positive int, got {c!r}")
    return outputs, aux


def upsample_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize to ``size`` (no-op when already there)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def fuse_scales(features: Sequence[Tensor]) -> Tensor:
    """Maps of several scales resized to the first one's size and concatenated."""
    size = features[0].shape[2:]
    return torch.cat([upsample_to(f, size) for f in features], dim=1)
