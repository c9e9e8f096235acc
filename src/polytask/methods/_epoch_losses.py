"""Per-epoch averages of the task losses, for the methods that reweight once per epoch.

DWA, LSB and TaskCurriculum set their weights at the start of an epoch from the average
training losses of the previous epochs (Liu et al., CVPR 2019: ``avg_cost`` in the official
MTAN code). The training loop passes ``epoch=`` to every ``backward``;
:class:`EpochLossAverages` adds each step's (detached) losses to a running sum and, at the
first step of a new epoch, turns the sum into that epoch's average and keeps the two most
recent averages.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from polytask.errors import InvalidContextError, InvalidLossesError

__all__ = ["EpochLossAverages"]


class EpochLossAverages(nn.Module):
    """Running sums of the task losses in the current epoch and the last two epochs' averages.

    ``averages[0]`` is the average of the most recent completed epoch, ``averages[1]`` of the
    one before; ``completed`` counts the completed epochs (at most 2 are kept). "Completed"
    means that a later epoch has started: the average of epoch t is known at the first step
    of epoch t + 1. Epochs in which ``backward`` was never called leave no average, so
    ``averages`` always holds the two most recent epochs that had steps.

    The sums live in float64 buffers on the losses' device (moved there on first use), so a
    step costs one in-place addition and no host synchronisation; the epoch counters are
    Python integers kept in the module's extra state, so ``state_dict`` round-trips them.
    """

    def __init__(self, num_tasks: int, *, positive: bool = True) -> None:
        super().__init__()
        #: Whether the averages must be positive (DWA and LSB divide by them).
        self.positive = positive
        self.register_buffer("running_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("averages", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.epoch = -1
        self.steps = 0
        self.completed = 0

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "completed": self.completed}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.steps = int(state["steps"])
        self.completed = int(state["completed"])

    def observe(self, losses: Tensor, epoch: int, owner: str) -> bool:
        """Add one step's ``losses`` to ``epoch``; return whether a previous epoch just ended.

        When it returns ``True``, ``averages`` holds the new averages; with ``positive`` they
        are checked to be positive (DWA and LSB divide by them) and a non-positive one raises
        :class:`~polytask.errors.InvalidLossesError` naming ``owner`` and the task.
        """
        if epoch < self.epoch:
            raise InvalidContextError(
                f"{owner}: epoch={epoch} is earlier than the epoch of the previous step "
                f"({self.epoch}); pass the training loop's epoch counter, which never decreases "
                "(restore the method's state_dict together with the model when resuming)"
            )
        if self.running_sum.device != losses.device:
            self.to(losses.device)
        ended = False
        if epoch > self.epoch:
            if self.steps > 0:
                average = self.running_sum / self.steps
                # Once per epoch, before any state changes: the methods divide by these.
                if self.positive and not bool((average > 0).all()):
                    bad = [i for i, v in enumerate(average.tolist()) if not v > 0]
                    raise InvalidLossesError(
                        f"{owner} needs positive task losses, but the average loss of task(s) "
                        f"{bad} over epoch {self.epoch} is {[average[i].item() for i in bad]}; "
                        "use non-negative losses that are not identically zero (e.g. shift a "
                        "log-likelihood loss) or a method that accepts any sign"
                    )
                self.averages[1].copy_(self.averages[0])
                self.averages[0].copy_(average)
                self.completed = min(self.completed + 1, 2)
                ended = True
            self.running_sum.zero_()
            self.steps = 0
            self.epoch = epoch
        self.running_sum.add_(losses.detach().to(self.running_sum.dtype))
        self.steps += 1
        return ended
