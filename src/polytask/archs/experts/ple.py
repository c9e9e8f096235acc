"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.experts._blocks import (
    ModuleSpec,
    SoftmaxGate,
    TowerSpec,
    build_module,
    build_towers,
    check_positive,
    flat_input,
    mix,
    output_features,
)
from polytask.archs.registry import register
from polytask.errors import InvalidHyperparameterError

__all__ = ["CGC", "PLE", "ExtractionLayer"]

_PAPER = (
    "Tang, Liu, Zhao & Gong, Progressive Layered Extraction (PLE): A Novel Multi-Task "
    "Learning (MTL) Model for Personalized Recommendations, RecSys 2020"
)


def _stack(experts: nn.ModuleList, x: Tensor) -> Tensor | None:
    return torch.stack([e(x) for e in experts], dim=1) if len(experts) else None


def _cat(*stacks: Tensor | None) -> Tensor:
    return torch.cat([s for s in stacks if s is not None], dim=1)


class ExtractionLayer(nn.Module):
    """One extraction network of PLE (section 4.2, eq. 6).

    Task-specific and shared experts; one gate per task over [its own experts, the shared
    experts] (eq. 4's order); below the top level, a shared gate over every expert of the
    layer. Task k's experts and gate read task k's representation from the level below,
    the shared experts and the shared gate read the shared one (all read x at level 1).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_features: int,
        num_specific: Mapping[str, int],
        num_shared: int,
        expert: ModuleSpec,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.task_experts = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    build_module("expert", expert, in_features) for _ in range(num_specific[t])
                )
                for t in self.tasks
            }
        )
        self.shared_experts = nn.ModuleList(
            build_module("expert", expert, in_features) for _ in range(num_shared)
        )
        self.task_gates = nn.ModuleDict(
            {t: SoftmaxGate(in_features, num_specific[t] + num_shared) for t in self.tasks}
        )
        total = sum(num_specific.values()) + num_shared
        self.shared_gate = SoftmaxGate(in_features, total) if shared_gate else None

    def forward(
        self, inputs: Mapping[str, Tensor], shared_input: Tensor, tasks: Sequence[str]
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Gate outputs g^{k,j} of ``tasks`` and g^{s,j} of the shared gate (``None`` at the
        top level). The shared gate mixes every task's experts, so it needs all tasks."""
        shared = _stack(self.shared_experts, shared_input)
        own = {t: _stack(self.task_experts[t], inputs[t]) for t in tasks}
        out = {
            t: mix(self.task_gates[t](inputs[t].flatten(1)), _cat(own[t], shared)) for t in tasks
        }
        if self.shared_gate is None:
            return out, None
        everything = _cat(*(own[t] for t in self.tasks), shared)
        return out, mix(self.shared_gate(shared_input.flatten(1)), everything)


@register("ple")
class PLE(MultiTaskModel):
    """Progressive Layered Extraction: stacked extraction networks, then one tower per task.

    Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020 (section 4.2,
    eq. 6-7). Level j has m_k experts per task k and m_s shared experts; task k's gate
    ``g^{k,j} = softmax(W^{k,j} g^{k,j-1}) [E_k; E_s]`` mixes its own and the shared
    experts, a shared gate mixes all experts of the level into g^{s,j} for the next level's
    shared experts; the gates of level j read the level-(j-1) gate output they belong to
    (x at level 1). The top level has no shared gate (nothing reads it); task k's output
    is ``t_k(g^{k,N})``. With one level this is CGC (:class:`CGC`, section 4.1).

    Args:
        tasks: task names or their number.
        in_features: the number of input features (``x.flatten(1)``'s width).
        num_shared: m_s, shared experts per level.
        num_specific: m_k, experts per task and level (int, or a mapping task -> int).
        expert: hidden widths of each expert's ReLU MLP, or a factory
            ``(in_features) -> module`` (called with ``in_features`` at level 1 and with
            ``expert_features`` above).
        tower: hidden widths of each task's ReLU MLP tower (then a linear layer to
            ``out_features``), or a factory ``(task, in_features) -> module``.
        num_levels: N, the number of extraction networks (paper's experiments: 2).
        out_features: outputs per task (int, or a mapping task -> int); MLP towers only.
        expert_features: the flattened output size of a factory expert (needed above
            level 1 and by MLP towers).

    The paper tunes m_s, m_k and the sizes (its experiments use single-layer experts and
    two levels). Task parameters of task k: its tower, its top-level experts and gate, and
    its level-(N-1) gate (whose output only task k's top level reads). Task k's experts
    below the top level feed the shared gate, so every task's loss reaches them: they
    count as shared parameters. No single shared representation (task experts read x).
    Departure: gates keep a bias (see :class:`~polytask.archs.experts._blocks.SoftmaxGate`).
    """

    paper = _PAPER + " (PLE, section 4.2)"

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        num_shared: int,
        num_specific: int | Mapping[str, int],
        expert: ModuleSpec,
        tower: TowerSpec,
        num_levels: int = 2,
        out_features: int | Mapping[str, int] = 1,
        expert_features: int | None = None,
    ) -> None:
        super().__init__(tasks)
        self.in_features = check_positive("in_features", in_features)
        self.num_levels = check_positive("num_levels", num_levels)
        specific = _per_task(self.tasks, num_specific)
        if isinstance(num_shared, bool) or not isinstance(num_shared, int) or num_shared < 0:
            raise InvalidHyperparameterError(f"num_shared={num_shared!r} must be an int >= 0")
        for t, m in specific.items():
            if m + num_shared < 1:
                raise InvalidHyperparameterError(
                    f"task {t!r} has no expert (num_specific=0 and num_shared=0); give it one"
                )
        width = output_features("expert", expert, expert_features)
        if num_levels > 1 and width is None:
            raise InvalidHyperparameterError(
                "levels above the first read the experts' outputs: with an expert factory, "
                "give its output size as expert_features"
            )
        self.levels = nn.ModuleList(
            ExtractionLayer(
                self.tasks,
                in_features if j == 0 else width,  # type: ignore[arg-type]
                specific,
                num_shared,
                expert,
                shared_gate=j < num_levels - 1,
            )
            for j in range(num_levels)
        )
        self.towers = build_towers(self.tasks, tower, width, out_features)

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = self.tasks if task is None else (self.check_task(task),)
        flat_input(x, self.in_features, type(self).__name__)
        inputs = {t: x for t in self.tasks}
        shared: Tensor | None = x
        for j, level in enumerate(self.levels):
            top = j == self.num_levels - 1
            inputs, shared = level(inputs, shared, wanted if top else self.tasks)
        return self._select({t: self.towers[t](inputs[t]) for t in wanted}, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        task = self.check_task(task)
        top = self.levels[-1]
        yield from top.task_experts[task].parameters()
        yield from top.task_gates[task].parameters()
        if self.num_levels > 1:
            yield from self.levels[-2].task_gates[task].parameters()
        yield from self.towers[task].parameters()


@register("cgc")
class CGC(PLE):
    """Customized Gate Control: task-specific and shared experts, one gate per task.

    Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task
    Learning (MTL) Model for Personalized Recommendations", RecSys 2020 (section 4.1,
    eq. 2-5): task k's gate ``g^k(x) = softmax(W^k x) [E_k(x); E_s(x)]`` mixes its m_k own
    experts and the m_s shared experts, and its tower reads the mixture: ``y_k = t_k(g^k(x))``.
    It is PLE with a single extraction network (no shared gate).

    Args: as :class:`PLE` without ``num_levels``. Task parameters: task k's experts, gate
    and tower; the shared experts are shared. Departure: gates keep a bias.
    """

    paper = _PAPER + " (CGC, section 4.1)"

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        num_shared: int,
        num_specific: int | Mapping[str, int],
        expert: ModuleSpec,
        tower: TowerSpec,
        out_features: int | Mapping[str, int] = 1,
        expert_features: int | None = None,
    ) -> None:
        super().__init__(
            tasks,
            in_features,
            num_shared,
            num_specific,
            expert,
            tower,
            num_levels=1,
            out_features=out_features,
            expert_features=expert_features,
        )


def _per_task(tasks: tuple[str, ...], value: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(value, Mapping):
        missing = sorted(set(tasks) - set(value))
        if missing:
            raise InvalidHyperparameterError(
                f"num_specific has no entry for tasks {missing}; give one per task"
            )
        out = {t: value[t] for t in tasks}
    else:
        out = dict.fromkeys(tasks, value)
    for t, m in out.items():
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise InvalidHyperparameterError(
                f"num_specific={m!r} for task {t!r} must be an int >= 0"
            )
    return out
