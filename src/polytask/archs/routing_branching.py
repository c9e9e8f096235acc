"""Learned branching: a Gumbel-softmax search over tree-structured sharing, exported to a
fixed tree (hard sharing up to the branch points)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.transformer_blocks import check_positive, per_task
from polytask.errors import InvalidHyperparameterError

__all__ = ["BranchedTree", "LearnToBranch"]

PAPER = (
    "Guo, Lee & Ulbricht, Learning to Branch for Multi-Task Learning, ICML 2020; "
    "Bruggemann, Kanakis, Georgoulis & Van Gool, Automated Search for Resource-Efficient "
    "Branched Multi-Task Networks, BMVC 2020"
)

Node = tuple[int, int]  # (layer, index within the layer)


def _default_block(in_features: int, out_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU())


class _TreeEvaluator:
    """Evaluates only the nodes a set of tasks needs, each once, from parent pointers."""

    def __init__(self, nodes: nn.ModuleDict, parents: Mapping[Node, int]) -> None:
        self.nodes, self.parents = nodes, parents
        self.cache: dict[Node, Tensor] = {}

    def __call__(self, x: Tensor, node: Node) -> Tensor:
        if node not in self.cache:
            layer, i = node
            inp = x if layer == 0 else self(x, (layer - 1, self.parents[node]))
            self.cache[node] = self.nodes[f"{layer}_{i}"](inp)
        return self.cache[node]


@register("learn_to_branch")
class LearnToBranch(MultiTaskModel):
    """Learning to branch: each node picks its parent by a Gumbel-softmax over learned logits.

    Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020 (the same
    Gumbel-softmax parent search underlies Bruggemann et al., BMVC 2020, who add a resource
    loss). The network has L layers of ``width`` candidate nodes (each a copy of the layer's
    block); node c of layer l >= 1 takes as input ``sum_p g_cp h_{l-1,p}`` with
    ``g_c = gumbel_softmax(theta_l[c], tau)`` over the nodes p of layer l - 1, and task t's
    head reads ``sum_p g_tp h_{L-1,p}`` with its own logits. Layer 0's nodes read the input.
    Training updates weights and logits (alternately in the paper); in eval mode each choice
    is its argmax, and :meth:`export` returns that argmax tree as a :class:`BranchedTree`,
    a fixed network that shares the nodes on common paths (hard sharing up to each branch
    point) and computes each node once.

    Parameters: the nodes and the layer logits can serve any task, so they are shared;
    each task owns its head and its head's parent logits.

    Args:
        tasks: task names or K.
        blocks: one block per layer, copied ``width`` times (e.g. ResNet stages); default
            Linear-ReLU blocks ``in_features -> hidden``.
        in_features, hidden: sizes of the default blocks (default 8 and (16, 16)).
        heads: per task (list or dict) a module on the last layer's features; default a
            linear layer from ``hidden[-1]`` (with your blocks, pass heads) to ``out_features``.
        out_features: outputs of each default head (default 1).
        width: candidate nodes per layer (default K, which allows any tree).
        tau: Gumbel-softmax temperature (anneal it by setting ``model.tau``; default 1).
        hard: straight-through one-hot samples instead of soft ones (default False).
    Needs: nothing beyond the task losses; the Gumbel noise uses torch's global generator,
    like dropout.

    Not included: Bruggemann et al.'s resource-aware loss on the expected FLOPs.
    """

    paper: ClassVar[str] = PAPER

    def __init__(
        self,
        tasks: Sequence[str] | int,
        *,
        blocks: Sequence[nn.Module] | None = None,
        in_features: int = 8,
        hidden: Sequence[int] = (16, 16),
        heads: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
        out_features: int | Sequence[int] | Mapping[str, int] = 1,
        width: int | None = None,
        tau: float = 1.0,
        hard: bool = False,
    ) -> None:
        super().__init__(tasks)
        width = width or self.num_tasks
        check_positive(width=width)
        if not tau > 0:
            raise InvalidHyperparameterError(f"tau={tau} must be > 0")
        if blocks is None:
            sizes = {f"hidden[{i}]": h for i, h in enumerate(hidden)}
            check_positive(in_features=in_features, **sizes)
            num_layers = len(hidden)
            widths = (in_features, *hidden)

            def make(layer: int) -> nn.Module:  # a fresh, independently initialised block
                return _default_block(widths[layer], widths[layer + 1])
        else:
            if heads is None:
                raise InvalidHyperparameterError("with your own `blocks`, pass `heads` too")
            num_layers = len(blocks)

            def make(layer: int) -> nn.Module:
                # Copies keep your (e.g. pretrained) weights; the Gumbel noise breaks the tie.
                return copy.deepcopy(blocks[layer])

        if num_layers < 1:
            raise InvalidHyperparameterError("give at least one layer (blocks or hidden)")
        self.width, self.tau, self.hard = width, tau, hard
        self.num_layers = num_layers
        self.nodes = nn.ModuleDict(
            {f"{k}_{i}": make(k) for k in range(num_layers) for i in range(width)}
        )
        self.layer_logits = nn.ParameterList(
            nn.Parameter(torch.zeros(width, width)) for _ in range(self.num_layers - 1)
        )
        self.head_logits = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(width)) for t in self.tasks}
        )
        if heads is None:
            outs = per_task(out_features, self.tasks, "out_features")
            heads = [nn.Linear(hidden[-1], o) for o in outs]
        self.heads = nn.ModuleDict(dict(zip(self.tasks, per_task(heads, self.tasks, "heads"))))

    # -- the search ----------------------------------------------------------------------
    def _gates(self, logits: Tensor) -> Tensor:
        return F.gumbel_softmax(logits, tau=self.tau, hard=self.hard, dim=-1)

    def _soft_forward(self, x: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        h = [self.nodes[f"0_{i}"](x) for i in range(self.width)]
        for layer, logits in enumerate(self.layer_logits, start=1):
            gates = self._gates(logits)
            stacked = torch.stack(h)
            mixed = torch.tensordot(gates, stacked, dims=([1], [0]))
            h = [self.nodes[f"{layer}_{c}"](mixed[c]) for c in range(self.width)]
        stacked = torch.stack(h)
        out = {}
        for t in names:
            feat = torch.tensordot(self._gates(self.head_logits[t]), stacked, dims=([0], [0]))
            out[t] = self.heads[t](feat)
        return out

    def tree(self) -> tuple[dict[Node, int], dict[str, Node]]:
        """The argmax tree: each node's parent index, and each task's leaf node."""
        parents = {
            (layer, c): int(logits[c].argmax())
            for layer, logits in enumerate(self.layer_logits, start=1)
            for c in range(self.width)
        }
        leaves = {t: (self.num_layers - 1, int(self.head_logits[t].argmax())) for t in self.tasks}
        return parents, leaves

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        names = self.tasks if task is None else (self.check_task(task),)
        if self.training:
            out = self._soft_forward(x, names)
        else:
            parents, leaves = self.tree()
            evaluate = _TreeEvaluator(self.nodes, parents)
            out = {t: self.heads[t](evaluate(x, leaves[t])) for t in names}
        return self._select(out, task)

    def export(self) -> BranchedTree:
        """The argmax tree as a fixed network (copies of the used nodes and the heads)."""
        parents, leaves = self.tree()
        used: dict[Node, int] = {}
        for leaf in leaves.values():
            node = leaf
            while True:
                used[node] = parents.get(node, -1)
                if node[0] == 0:
                    break
                node = (node[0] - 1, parents[node])
        nodes = {f"{k}_{i}": copy.deepcopy(self.nodes[f"{k}_{i}"]) for k, i in used}
        heads = {t: copy.deepcopy(self.heads[t]) for t in self.tasks}
        return BranchedTree(self.tasks, nodes=nodes, parents=used, leaves=leaves, heads=heads)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield self.head_logits[task]
        yield from self.heads[task].parameters()


class BranchedTree(MultiTaskModel):
    """A fixed tree-structured multi-task network, as exported by :meth:`LearnToBranch.export`.

    Nodes are computed once per forward and shared by every task whose path passes through
    them, i.e. hard sharing up to each branch point. A node used by a single task is that
    task's own parameter; nodes on the paths of several tasks are shared.

    Args:
        tasks: task names.
        nodes: ``{"layer_index": module}`` of the nodes in the tree.
        parents: ``{(layer, index): parent index in layer - 1}`` (layer-0 nodes read x).
        leaves: ``{task: (last layer, index)}``, the node each task's head reads.
        heads: ``{task: module}``.
    """

    paper: ClassVar[str] = PAPER

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        nodes: Mapping[str, nn.Module],
        parents: Mapping[Node, int],
        leaves: Mapping[str, Node],
        heads: Mapping[str, nn.Module],
    ) -> None:
        super().__init__(tasks)
        self.nodes = nn.ModuleDict(dict(nodes))
        self.parents, self.leaves = dict(parents), dict(leaves)
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self.users: dict[Node, set[str]] = {}
        for t, leaf in self.leaves.items():
            node = leaf
            while True:
                if f"{node[0]}_{node[1]}" not in self.nodes:
                    raise InvalidHyperparameterError(f"node {node} on task {t!r}'s path is missing")
                self.users.setdefault(node, set()).add(t)
                if node[0] == 0:
                    break
                node = (node[0] - 1, self.parents[node])

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        names = self.tasks if task is None else (self.check_task(task),)
        evaluate = _TreeEvaluator(self.nodes, self.parents)
        out = {t: self.heads[t](evaluate(x, self.leaves[t])) for t in names}
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        for (layer, i), users in self.users.items():
            if users == {task}:
                yield from self.nodes[f"{layer}_{i}"].parameters()
        yield from self.heads[task].parameters()
