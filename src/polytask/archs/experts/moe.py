"""Mixture-of-experts architectures: one gate for all tasks (OMoE), one per task (MMoE)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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
    stack_experts,
)
from polytask.archs.registry import register
from polytask.errors import PolytaskError

__all__ = ["MMoE", "OMoE"]

_PAPER = (
    "Ma, Zhao, Yi, Chen, Hong & Chi, Modeling Task Relationships in Multi-task Learning "
    "with Multi-gate Mixture-of-Experts, KDD 2018"
)


class _Experts(MultiTaskModel):
    """Shared experts, towers and argument checks common to OMoE, MMoE and DSelect-k."""

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        num_experts: int,
        expert: ModuleSpec,
        tower: TowerSpec,
        out_features: int | Mapping[str, int],
        expert_features: int | None,
    ) -> None:
        super().__init__(tasks)
        self.in_features = check_positive("in_features", in_features)
        self.num_experts = check_positive("num_experts", num_experts)
        width = output_features("expert", expert, expert_features)
        self.experts = nn.ModuleList(
            build_module("expert", expert, in_features) for _ in range(num_experts)
        )
        self.towers = build_towers(self.tasks, tower, width, out_features)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(gate input [B, in_features], stacked expert outputs [B, E, ...])."""
        flat = flat_input(x, self.in_features, type(self).__name__)
        return flat, stack_experts(self.experts, x)


@register("omoe")
class OMoE(_Experts):
    """One-gate mixture of experts: ``y_k = h_k(sum_i g(x)_i f_i(x))``, ``g = softmax(W x)``.

    The one-gate MoE baseline (OMoE) of Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018
    (section 4.2: the MoE layer of eq. 5, after Jacobs et al., 1991, in place of the shared
    bottom): shared experts f_i mixed by one softmax gate that every task shares, then one
    tower h_k per task. Hyper-parameters
    (tuned per data set in the paper, no defaults): the number of experts, the expert and
    tower sizes.

    Args: as :class:`MMoE`.

    Since the gate is shared, the gated mixture [B, D] is the shared representation
    (:meth:`encode`); the towers are the task parameters. The gate keeps a bias (see
    :class:`~polytask.archs.experts._blocks.SoftmaxGate`).
    """

    paper = _PAPER + " (OMoE baseline, section 4.2)"
    has_shared_representation = True

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        num_experts: int,
        expert: ModuleSpec,
        tower: TowerSpec,
        out_features: int | Mapping[str, int] = 1,
        expert_features: int | None = None,
    ) -> None:
        super().__init__(
            tasks, in_features, num_experts, expert, tower, out_features, expert_features
        )
        self.gate = SoftmaxGate(in_features, num_experts)

    def encode(self, x: Tensor) -> Tensor:
        flat, stacked = self._inputs(x)
        return mix(self.gate(flat), stacked)

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            return self.towers[self.check_task(task)](features)
        return {t: self.towers[t](features) for t in self.tasks}

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        return self.decode(self.encode(x), task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.towers[self.check_task(task)].parameters()


class _GatedPerTask(_Experts):
    """Per-task gates on shared experts; encode/decode with the gate input kept aside.

    The experts' stacked outputs [B, E, ...] are everything the tasks share, so they are the
    shared representation. The gates read the input x itself, not the experts' outputs,
    so :meth:`encode` keeps ``x`` (flattened) for the next :meth:`decode`: call them in
    pairs on the same batch, as a features-mode training step does.
    """

    has_shared_representation = True
    _gate_input: Tensor | None = None

    def _weights(self, task: str, gate_input: Tensor) -> Tensor:
        """Task ``task``'s expert weights [B, E] (or [E])."""
        raise NotImplementedError

    def _decode(self, stacked: Tensor, gate_input: Tensor, task: str | None) -> dict[str, Tensor]:
        tasks = self.tasks if task is None else (self.check_task(task),)
        return {t: self.towers[t](mix(self._weights(t, gate_input), stacked)) for t in tasks}

    def encode(self, x: Tensor) -> Tensor:
        flat, stacked = self._inputs(x)
        self._gate_input = flat
        return stacked

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        gate_input = self._gate_input
        if gate_input is None:
            raise PolytaskError(
                f"{type(self).__name__}.decode needs the gates' input of the batch: call "
                "encode(x) on the same batch first"
            )
        if gate_input.shape[0] != features.shape[0]:
            raise PolytaskError(
                f"{type(self).__name__}.decode got features of {features.shape[0]} examples but "
                f"the last encode(x) was on {gate_input.shape[0]}; encode this batch first"
            )
        return self._select(self._decode(features, gate_input, task), task)

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        flat, stacked = self._inputs(x)
        return self._select(self._decode(stacked, flat, task), task)


@register("mmoe")
class MMoE(_GatedPerTask):
    """Multi-gate mixture of experts: ``y_k = h_k(sum_i g_k(x)_i f_i(x))``, one gate per task.

    Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018 (section 4.2, eq. 6-8): experts f_1..f_n shared
    by all tasks; each task k mixes them with its own gate ``g_k(x) = softmax(W_gk x)`` and
    reads the mixture with its tower h_k. Hyper-parameters (tuned per data set in the
    paper, which caps "number of experts x hidden units per expert" at 2048; no defaults):
    the number of experts, the expert and tower sizes (its synthetic runs, section 5.1: 8
    single-layer experts of 16 ReLU units, single-layer towers of 8).

    Args:
        tasks: task names or their number.
        in_features: the number of input features (``x.flatten(1)``'s width); the gates
            read the flattened input.
        num_experts: n, the number of shared experts.
        expert: hidden widths of each expert's ReLU MLP (ReLU after the last layer too, as
            the paper's experts are ReLU layers), or a factory ``(in_features) -> module``.
        tower: hidden widths of each task's ReLU MLP tower (then a linear layer to
            ``out_features``), or a factory ``(task, in_features) -> module``.
        out_features: outputs per task (int, or a mapping task -> int); MLP towers only.
        expert_features: the flattened output size of a factory expert (needed by MLP towers).

    Shared representation: the experts' stacked outputs [B, n, D] (:meth:`encode`); gates
    and towers are the task parameters (:meth:`decode`). Departure: the gate
    ``softmax(W x + b)`` keeps a bias, as LibMTL and the open-source re-implementations do.
    """

    paper = _PAPER

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        num_experts: int,
        expert: ModuleSpec,
        tower: TowerSpec,
        out_features: int | Mapping[str, int] = 1,
        expert_features: int | None = None,
    ) -> None:
        super().__init__(
            tasks, in_features, num_experts, expert, tower, out_features, expert_features
        )
        self.gates = nn.ModuleDict({t: SoftmaxGate(in_features, num_experts) for t in self.tasks})

    def _weights(self, task: str, gate_input: Tensor) -> Tensor:
        return self.gates[task](gate_input)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        task = self.check_task(task)
        yield from self.gates[task].parameters()
        yield from self.towers[task].parameters()
