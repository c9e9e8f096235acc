"""Feature distillation from single-task teachers through task adaptors (Li & Bilen, 2020)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.distill._teachers import FrozenTeachers, per_task
from polytask.errors import InvalidHyperparameterError

__all__ = ["ChannelAdaptor", "FeatureDistillation", "normalize_channels"]

#: Added under the square root of the channel norm, as in the official code.
_EPS = 1e-6


def normalize_channels(features: Tensor) -> Tensor:
    """f / sqrt(sum_c f_c^2 + 1e-6): unit norm over the channel dimension (dim 1) at every
    position, as the official code normalises both the student's and the teacher's features."""
    return features / (features.pow(2).sum(dim=1, keepdim=True) + _EPS).sqrt()


class ChannelAdaptor(nn.Module):
    """A 1x1 convolution without bias: y[:, o, ...] = sum_c W[o, c] x[:, c, ...].

    The same linear map over the channel dimension at every position, for features of any
    rank ([B, C] vectors or [B, C, H, W] maps). Xavier-normal initialisation, as the official
    code's adaptors.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        nn.init.xavier_normal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"the adaptor expects features [B, {self.weight.shape[1]}, ...], got "
                f"{tuple(x.shape)}"
            )
        return torch.einsum("oc,bc...->bo...", self.weight.to(x.dtype), x)


class FeatureDistillation(nn.Module):
    """Per-task feature-distillation losses: the student's shared features, through a
    task-specific adaptor, should match that task's single-task teacher's features.

    For task k with the student's shared features f_s [B, C_s, ...], teacher k's features
    f_k [B, C_k, ...] (frozen, eval mode, no grad) and the learned adaptor A_k (a 1x1
    convolution C_s -> C_k without bias, :class:`ChannelAdaptor`):

        L_k = mean over batch and positions of || n(A_k f_s) - n(f_k) ||^2,

    n the unit normalisation over channels at each position (:func:`normalize_channels`).
    Li & Bilen, "Knowledge Distillation for Multi-task Learning", ECCV Workshops 2020
    (Eq. 3-4; official code github.com/VICO-UoE/KD4MTL). The student minimises
    sum_k w_k L_task_k + sum_k lambda_k L_k; the adaptors minimise the L_k too: add
    :meth:`adaptor_parameters` to an optimizer (the official code: Adam, lr 0.1, weight decay
    5e-4, and lambda = (1, 1, 2) for segmentation, depth and normals on NYUv2).

    ``forward`` returns the K losses [K]; stack or add them to the task losses to use any
    balancing method, e.g. ``method.backward(task_losses + lam * kd(f_s, inputs=x), ...)``.
    For several feature levels (the official SegNet code distils two) use one instance per
    level.

    Args:
        teachers: per task, a frozen module mapping the task's input to its feature map
            (sequence, or mapping by task name).
        student_channels: C_s.
        teacher_channels: C_k per task (or one int for all).
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        student_channels: int,
        teacher_channels: int | Sequence[int],
    ) -> None:
        super().__init__()
        self.teachers = FrozenTeachers(teachers)
        k = len(self.teachers)
        channels = [teacher_channels] * k if isinstance(teacher_channels, int) else teacher_channels
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise InvalidHyperparameterError(
                f"teacher_channels must be an int or one int per task, got {teacher_channels!r}"
            )
        channels = list(channels)
        if len(channels) != k:
            raise InvalidHyperparameterError(
                f"teacher_channels has {len(channels)} entries but there are {k} teachers"
            )
        for c in [student_channels, *channels]:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise InvalidHyperparameterError(f"channel count {c!r} must be a positive int")
        self.student_channels = student_channels
        self.teacher_channels = tuple(channels)
        self.adaptors = nn.ModuleList(ChannelAdaptor(student_channels, c) for c in channels)

    def adaptor_parameters(self) -> Iterator[nn.Parameter]:
        """The learnable parameters (the adaptors; the teachers are frozen)."""
        return self.adaptors.parameters()

    def forward(
        self,
        student_features: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
        *,
        inputs: Any = None,
        task_inputs: Any = None,
    ) -> Tensor:
        """The K per-task distillation losses [K].

        Args:
            student_features: the student's shared representation [B, C_s, ...] of
                ``inputs``; with ``task_inputs``, one such tensor per task (the student's
                features of that task's batch).
            inputs: the batch every teacher reads; or
            task_inputs: one batch per task.
        """
        teacher_features = self.teachers(inputs, task_inputs)
        k = len(self.teachers)
        if task_inputs is None:
            per = [student_features] * k
        else:
            per = per_task(student_features, self.teachers, "student_features")
        losses = []
        for i, (adaptor, f_s, f_t) in enumerate(zip(self.adaptors, per, teacher_features)):
            name = self.teachers.names[i]
            self._check_student(f_s, name)
            mapped = adaptor(f_s)
            if not isinstance(f_t, Tensor) or f_t.shape != mapped.shape:
                raise ValueError(
                    f"task {name!r}: the teacher's features have shape "
                    f"{tuple(getattr(f_t, 'shape', ())) or type(f_t).__name__} but the adapted "
                    f"student features {tuple(mapped.shape)}; check teacher_channels and that "
                    "both networks see the same batch at the same resolution"
                )
            diff = normalize_channels(mapped) - normalize_channels(f_t.detach().to(mapped.dtype))
            losses.append(diff.pow(2).sum(dim=1).mean())
        return torch.stack(losses)

    def _check_student(self, features: Any, name: str) -> None:
        if not isinstance(features, Tensor) or features.dim() < 2:
            raise ValueError(
                f"task {name!r}: student features must be a tensor [B, C_s, ...], got "
                f"{tuple(getattr(features, 'shape', ())) or type(features).__name__}"
            )
        if features.shape[1] != self.student_channels:
            raise ValueError(
                f"task {name!r}: student features have {features.shape[1]} channels (dim 1) "
                f"but the adaptors were built for student_channels={self.student_channels}"
            )
