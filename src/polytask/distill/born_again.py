"""BAM: born-again multi-task networks with teacher annealing (Clark et al., ACL 2019)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.distill._teachers import FrozenTeachers, per_task
from polytask.errors import InvalidHyperparameterError

__all__ = ["KINDS", "BornAgainDistillation"]

#: The task kinds :class:`BornAgainDistillation` knows.
KINDS = ("classification", "regression")


class BornAgainDistillation(nn.Module):
    """Per-task distillation losses from single-task teachers, with teacher annealing.

    For task k with student output s_k, gold label y_k and teacher output t_k (the frozen
    single-task model of that task, run on the same input), the loss is the task's usual
    loss against the mixed target

        target_k = lambda y_k + (1 - lambda) t_k,   lambda = min(step / total_steps, 1),

    with lambda annealed linearly from 0 (pure distillation) to 1 (pure supervised) over
    training: cross-entropy -sum_c target_c log softmax(s)_c against one_hot(y) mixed with the
    teacher's softmax for ``"classification"`` (logits [B, C, ...], class indices [B, ...]),
    and the squared error (s - target)^2 for ``"regression"`` (targets of the student's
    shape). Clark, Luong, Khandelwal, Manning & Le, "BAM! Born-Again Multi-Task Networks for
    Natural Language Understanding", ACL 2019 (Section 3, teacher annealing).

    ``forward`` returns the K losses as one tensor, batch-means, so they compose with any
    balancing method: ``method.backward(bam(out, y, inputs=x), shared_params=...)``. Call
    :meth:`step` once per training step (like an LR scheduler); the step count is a buffer,
    so ``state_dict()`` checkpoints the schedule. The teachers are frozen and stay in eval
    mode whatever ``train()`` says, and run under ``torch.no_grad()``.

    Args:
        teachers: one single-task model per task (sequence, or mapping by task name); each
            maps the task's input to an output of the student's shape for that task.
        kinds: ``"classification"`` or ``"regression"`` per task.
        total_steps: T, the number of training steps over which lambda goes from 0 to 1
            (the paper anneals over the whole training run).
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        kinds: Sequence[str],
        *,
        total_steps: int,
    ) -> None:
        super().__init__()
        self.teachers = FrozenTeachers(teachers)
        k = len(self.teachers)
        if isinstance(kinds, (str, bytes)) or not isinstance(kinds, Sequence) or len(kinds) != k:
            raise InvalidHyperparameterError(
                f"kinds must list one of {KINDS} for each of the {k} teachers, got {kinds!r}"
            )
        bad = [x for x in kinds if x not in KINDS]
        if bad:
            raise InvalidHyperparameterError(f"kinds {bad} are not among {KINDS}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise InvalidHyperparameterError(
                f"total_steps={total_steps!r} must be a positive integer (the training length)"
            )
        self.kinds = tuple(kinds)
        self.total_steps = total_steps
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def mix(self) -> float:
        """lambda, the weight of the gold label in the targets: min(step / T, 1)."""
        return min(int(self.steps_done) / self.total_steps, 1.0)

    def step(self) -> None:
        """Advance the annealing schedule by one training step."""
        self.steps_done += 1

    def forward(
        self,
        student_outputs: Sequence[Tensor] | Mapping[str, Tensor],
        targets: Sequence[Tensor] | Mapping[str, Tensor],
        *,
        inputs: Any = None,
        task_inputs: Any = None,
    ) -> Tensor:
        """The K per-task losses [K] on this batch at the current lambda.

        Args:
            student_outputs: the student's output per task (sequence or mapping by name).
            targets: the gold labels per task.
            inputs: the batch every teacher reads (single-input MTL); or
            task_inputs: one batch per task (each task its own data, as in GLUE).
        """
        outs = per_task(student_outputs, self.teachers, "student_outputs")
        ys = per_task(targets, self.teachers, "targets")
        teacher_outs = self.teachers(inputs, task_inputs)
        lam = self.mix
        losses = []
        for k, (kind, s, y, t) in enumerate(zip(self.kinds, outs, ys, teacher_outs)):
            name = self.teachers.names[k]
            if not isinstance(s, Tensor) or not isinstance(t, Tensor):
                raise TypeError(
                    f"task {name!r}: the student's and the teacher's outputs must be tensors"
                )
            if t.shape != s.shape:
                raise ValueError(
                    f"task {name!r}: the teacher's output has shape {tuple(t.shape)} but the "
                    f"student's {tuple(s.shape)}; they must predict the same thing"
                )
            if kind == "classification":
                losses.append(_soft_cross_entropy(s, y, t.detach(), lam, name))
            else:
                losses.append(_mixed_squared_error(s, y, t.detach(), lam, name))
        return torch.stack(losses)


def _soft_cross_entropy(logits: Tensor, labels: Any, teacher: Tensor, lam: float, name: str):
    if logits.dim() < 2:
        raise ValueError(
            f"task {name!r} (classification): logits must be [B, C, ...], got {tuple(logits.shape)}"
        )
    want = (logits.shape[0], *logits.shape[2:])
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.shape != want:
        raise ValueError(
            f"task {name!r} (classification): targets must be integer class indices of shape "
            f"{want}, got {getattr(labels, 'dtype', type(labels).__name__)} "
            f"{tuple(getattr(labels, 'shape', ()))}"
        )
    c = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ValueError(
            f"task {name!r} (classification): class indices must lie in [0, {c - 1}], got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    gold = F.one_hot(labels, c).movedim(-1, 1).to(logits.dtype)
    target = lam * gold + (1.0 - lam) * torch.softmax(teacher.to(logits.dtype), dim=1)
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _mixed_squared_error(pred: Tensor, y: Any, teacher: Tensor, lam: float, name: str):
    if not isinstance(y, Tensor) or y.shape != pred.shape:
        raise ValueError(
            f"task {name!r} (regression): targets must have the student's shape "
            f"{tuple(pred.shape)}, got {tuple(getattr(y, 'shape', ())) or type(y).__name__}"
        )
    target = lam * y.to(pred.dtype) + (1.0 - lam) * teacher.to(pred.dtype)
    return ((pred - target) ** 2).mean()
