"""Task losses that skip missing labels.

Missing labels follow one convention per kind of target: integer class targets use
``ignore_index`` (default -1), float targets NaN, depth maps 0 (the NYUv2/Cityscapes
convention: no depth measured) and surface normals the zero vector. Each loss is the mean
over the labelled elements only; a batch with no label for the task gives an exact zero that
stays connected to the prediction (so the backward pass is well defined), and
:func:`has_labels` tells the training loop that the task is absent from the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bce_with_logits",
    "cross_entropy",
    "depth_l1",
    "has_labels",
    "l1",
    "mse",
    "normal_cosine",
]


def _masked_mean(values: Tensor, mask: Tensor, anchor: Tensor) -> Tensor:
    count = mask.sum()
    if int(count) == 0:
        return anchor.sum() * 0.0
    return (values * mask).sum() / count


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy over labelled samples (or pixels: logits [B, C, ...])."""
    mask = target != ignore_index
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def bce_with_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Mean binary cross-entropy over labelled entries (NaN targets are missing)."""
    logits = logits.reshape(target.shape) if logits.numel() == target.numel() else logits
    mask = ~torch.isnan(target)
    values = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(target), reduction="none")
    return _masked_mean(values, mask, logits)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over labelled entries (NaN targets are missing)."""
    pred = pred.reshape(target.shape) if pred.numel() == target.numel() else pred
    mask = ~torch.isnan(target)
    return _masked_mean((pred - torch.nan_to_num(target)) ** 2, mask, pred)


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over labelled entries (NaN targets are missing)."""
    pred = pred.reshape(target.shape) if pred.numel() == target.numel() else pred
    mask = ~torch.isnan(target)
    return _masked_mean((pred - torch.nan_to_num(target)).abs(), mask, pred)


def depth_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 depth loss over pixels with a measured depth (target != 0), as in MTAN (Liu et al.,
    CVPR 2019) and LibMTL. ``pred``/``target``: [B, 1, H, W]."""
    mask = target != 0
    return _masked_mean((pred - target).abs(), mask, pred)


def normal_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """1 - cos(pred, target) over pixels with a ground-truth normal (non-zero vector); the
    prediction is L2-normalised over channels first, as in MTAN. Shapes [B, 3, H, W]."""
    pred_n = pred / pred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    mask = target.abs().sum(dim=1) != 0
    cos = (pred_n * target).sum(dim=1)
    return _masked_mean(1.0 - cos, mask, pred)


def has_labels(target: Tensor, *, ignore_index: int = -1, kind: str = "auto") -> bool:
    """Whether ``target`` holds at least one label under the conventions above.

    ``kind``: ``"auto"`` (integer: ignore_index; float: NaN), ``"depth"`` (0 is missing) or
    ``"normals"`` (the zero vector over dim 1 is missing).
    """
    if kind == "depth":
        return bool((target != 0).any())
    if kind == "normals":
        return bool((target.abs().sum(dim=1) != 0).any())
    if kind != "auto":
        raise ValueError(f"kind={kind!r} must be 'auto', 'depth' or 'normals'")
    if target.is_floating_point():
        return bool((~torch.isnan(target)).any())
    return bool((target != ignore_index).any())
