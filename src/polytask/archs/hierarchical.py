"""Hierarchical MTL: tasks supervised at different depths of one stack of shared stages."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.hard_sharing import as_stage_list, check_disjoint, per_task_heads
from polytask.archs.registry import register
from polytask.errors import PolytaskError

__all__ = ["Hierarchical"]

# Values of the ``sr_scope`` buffer besides a task index.
_NO_SNAPSHOT = -1
_EMBEDDING_ONLY = -2


@register("hierarchical")
class Hierarchical(MultiTaskModel):
    """Tasks supervised at different depths of a stack of shared stages, low-level tasks
    lower (Søgaard & Goldberg, "Deep multi-task learning with low level tasks supervised at
    lower layers", ACL 2016), with the shortcut connections of HMTL (Sanh, Wolf & Ruder, "A
    Hierarchical Multi-task Approach for Learning Embeddings from Semantic Tasks", AAAI
    2019) and JMT (Hashimoto, Xiong, Tsuruoka & Socher, "A Joint Many-Task Model: Growing a
    Neural Network for Multiple NLP Tasks", EMNLP 2017), and JMT's successive regularisation.

    ``e = embedding(x)`` (identity when not given); stage 1 reads ``e``, stage k > 1 reads
    ``h_{k-1}`` or, with shortcuts, ``[h_{k-1}; e]`` (``"concat"`` along ``shortcut_dim``:
    JMT's and HMTL's word representations fed to every layer) or ``h_{k-1} + e`` (``"add"``).
    Task t at depth d reads ``h_d``: ``y_t = head_t(h_d)``. Computing task t runs only
    stages 1..d, so t never depends on the stages above its depth.

    Args:
        tasks: task names or their number K.
        stages: the stack, a list of modules (a list, ``nn.Sequential`` or ``nn.ModuleList``);
            the paper networks use one bi-LSTM layer per stage (wrap ``nn.LSTM`` to return its
            output tensor).
        heads: ``{task: module}``, a list in task order, or one module copied per task.
        depths: the stage each task reads, 1..len(stages): ``{task: depth}`` or a list in task
            order (Søgaard & Goldberg: POS at 1, chunking at 3; JMT: POS 1, chunking 2,
            dependencies 3, relatedness 4, entailment 5). Every stage must be read by some
            task at or above it.
        embedding: optional module applied to the input first (JMT's θ_e, the word and
            character n-gram embeddings); its output is what shortcuts feed upward.
        shortcut: ``None`` (Søgaard & Goldberg), ``"concat"`` (JMT, HMTL) or ``"add"``.
        shortcut_dim: the feature dimension for ``"concat"`` (-1: ``[B, T, C]`` sequences;
            use 1 for ``[B, C, H, W]`` images).
        successive_regularization: keep snapshot buffers for JMT's successive regularisation
            (off by default, as in Søgaard & Goldberg and HMTL; it doubles the memory of the
            embedding, stages and heads).
        delta: JMT's coefficient δ of the term on the stack and embedding parameters (10⁻³,
            the paper's value).
        delta_head: its coefficient on the lower task's classifier parameters (10⁻², the
            paper's value).

    Successive regularisation (JMT section 3): tasks are trained in turn, bottom to top, each
    for a full pass over its data per epoch; the loss of the task trained after task s adds
    ``δ‖θ_s − θ'_s‖²``, where θ_s is everything s's output depends on (embedding, stages
    1..depth(s), s's head, the head with ``delta_head``) and θ'_s its value after s's turn in
    this epoch. Call :meth:`snapshot` with s when s's turn ends; :meth:`aux_loss` then returns
    the term until the next snapshot. After the top task, the next task trained is the bottom
    one (next epoch), whose term (JMT eq. 6) is on the embedding only, ``δ‖θ_e − θ'_e‖²``, so
    snapshotting the last task in the bottom-to-top order (ties: the order of ``tasks``)
    restricts the term to the embedding (there is none without an ``embedding`` module:
    :meth:`aux_loss` is then ``None`` until the next snapshot). The snapshot lives in buffers,
    so a checkpoint taken mid-epoch keeps it. Usage, JMT's schedule::

        for epoch in range(epochs):
            for task in model.order:  # bottom to top
                for x, y in loaders[task]:
                    loss = criterion[task](model(x, task=task), y)
                    aux = model.aux_loss()
                    (loss if aux is None else loss + aux).backward()
                    ...
                model.snapshot(task)

    Partition (honest, by dependence): a stage or the embedding is shared when two or more
    tasks read it (every stage up to the second-highest depth, and all of them when K = 1);
    the stages above every other task's depth are read by the top task alone and are its
    own parameters, with its head.

    Departures: JMT also feeds the lower tasks' weighted label embeddings into higher layers;
    that couples the heads (a lower head would no longer be its task's own) and is not
    implemented. JMT's per-task L2 terms and growing gradient clipping are the trainer's.
    There is no single shared representation (tasks read different depths), so only
    ``mode="params"`` balancing applies.
    """

    paper = (
        "Søgaard & Goldberg, Deep multi-task learning with low level tasks supervised at lower "
        "layers, ACL 2016; Hashimoto, Xiong, Tsuruoka & Socher, A Joint Many-Task Model, "
        "EMNLP 2017; Sanh, Wolf & Ruder, A Hierarchical Multi-task Approach for Learning "
        "Embeddings from Semantic Tasks, AAAI 2019"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: Sequence[nn.Module],
        heads: Mapping[str, nn.Module] | Sequence[nn.Module] | nn.Module,
        depths: Mapping[str, int] | Sequence[int],
        embedding: nn.Module | None = None,
        shortcut: Literal["concat", "add"] | None = None,
        shortcut_dim: int = -1,
        successive_regularization: bool = False,
        delta: float = 1e-3,
        delta_head: float = 1e-2,
    ) -> None:
        super().__init__(tasks)
        self.stages = nn.ModuleList(as_stage_list(stages, "stages"))
        self.heads = per_task_heads(self.tasks, heads)
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(
                f"embedding must be an nn.Module or None, got {type(embedding).__name__}"
            )
        self.embedding = embedding if embedding is not None else nn.Identity()
        self.depths = self._check_depths(depths)
        if shortcut not in (None, "concat", "add"):
            raise ValueError(f"shortcut={shortcut!r} must be None, 'concat' or 'add'")
        self.shortcut = shortcut
        self.shortcut_dim = shortcut_dim
        for name, value in (("delta", delta), ("delta_head", delta_head)):
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name}={value} must be a finite non-negative number")
        self.delta, self.delta_head = float(delta), float(delta_head)
        trunk = nn.ModuleList([self.embedding, *self.stages])
        check_disjoint(trunk, {t: self.heads[t] for t in self.tasks}, type(self).__name__)
        # Bottom-to-top training order of JMT; ties keep the order of ``tasks``.
        self.order = sorted(self.tasks, key=lambda t: self.depths[t])
        top = max(self.depths.values())
        others = sorted((self.depths[t] for t in self.tasks), reverse=True)[1:]
        # Stages 1..shared_depth are read by two or more tasks (or by the only task).
        self.shared_depth = others[0] if others else top
        self.owner = self.order[-1] if self.shared_depth < top else None

        self.check_partition()

        self.successive_regularization = successive_regularization
        if successive_regularization:
            self.snapshots = nn.Module()
            for i, p in enumerate(self._trunk_and_heads()):
                self.snapshots.register_buffer(f"p{i}", p.detach().clone())
            self.register_buffer("sr_scope", torch.tensor(_NO_SNAPSHOT))

    def _check_depths(self, depths: Mapping[str, int] | Sequence[int]) -> dict[str, int]:
        if isinstance(depths, Mapping):
            if set(depths) != set(self.tasks):
                raise ValueError(
                    f"depths has keys {sorted(map(str, depths))} but the tasks are "
                    f"{list(self.tasks)}; give one depth per task"
                )
            out = {t: depths[t] for t in self.tasks}
        elif isinstance(depths, Sequence) and not isinstance(depths, str):
            if len(depths) != self.num_tasks:
                raise ValueError(
                    f"depths={list(depths)} has {len(depths)} entries for {self.num_tasks} tasks"
                )
            out = dict(zip(self.tasks, depths))
        else:
            raise TypeError(f"depths must be a dict {{task: depth}} or a list, got {depths!r}")
        n = len(self.stages)
        for t, d in out.items():
            if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= n:
                raise ValueError(
                    f"depth {d!r} of task {t!r} must be an int in 1..{n} (the number of stages)"
                )
        if max(out.values()) < n:
            raise ValueError(
                f"stages {max(out.values()) + 1}..{n} are read by no task (the highest depth is "
                f"{max(out.values())}); remove them or supervise a task there"
            )
        return out

    # -- forward -------------------------------------------------------------------------
    def _stage_input(self, h: Tensor, e: Tensor) -> Tensor:
        if self.shortcut == "concat":
            return torch.cat([h, e], dim=self.shortcut_dim)
        if self.shortcut == "add":
            return h + e
        return h

    def _run(self, x: Any, depth: int) -> list[Tensor]:
        """``[h_1, ..., h_depth]``."""
        e = self.embedding(x)
        hidden = [self.stages[0](e)]
        for k in range(1, depth):
            hidden.append(self.stages[k](self._stage_input(hidden[-1], e)))
        return hidden

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            t = self.check_task(task)
            return self.heads[t](self._run(x, self.depths[t])[-1])
        hidden = self._run(x, max(self.depths.values()))
        return {t: self.heads[t](hidden[self.depths[t] - 1]) for t in self.tasks}

    # -- parameters ----------------------------------------------------------------------
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        t = self.check_task(task)
        if t == self.owner:
            for stage in self.stages[self.shared_depth :]:
                yield from stage.parameters()
        yield from self.heads[t].parameters()

    # -- successive regularisation --------------------------------------------------------
    def _trunk_and_heads(self) -> list[nn.Parameter]:
        # A fixed order: embedding, stages bottom-up, heads in task order; the snapshot
        # buffers p0, p1, ... follow it.
        modules = [self.embedding, *self.stages, *(self.heads[t] for t in self.tasks)]
        return list({id(p): p for m in modules for p in m.parameters()}.values())

    def _scope(self, scope: int) -> list[tuple[nn.Parameter, Tensor, float]]:
        """(parameter, snapshot, coefficient) for θ_s (or θ_e) of the current snapshot."""
        if scope == _NO_SNAPSHOT:
            return []
        snaps = dict(self.snapshots.named_buffers())
        index = {id(p): snaps[f"p{i}"] for i, p in enumerate(self._trunk_and_heads())}
        modules: list[tuple[nn.Module, float]] = [(self.embedding, self.delta)]
        if scope != _EMBEDDING_ONLY:
            t = self.tasks[scope]
            modules += [(s, self.delta) for s in self.stages[: self.depths[t]]]
            modules.append((self.heads[t], self.delta_head))
        # Keyed by parameter so that a weight tied between two stages counts once.
        terms = {id(p): (p, index[id(p)], c) for m, c in modules for p in m.parameters()}
        return list(terms.values())

    def _require_sr(self) -> None:
        if not self.successive_regularization:
            raise PolytaskError(
                "successive regularisation is off; build Hierarchical with "
                "successive_regularization=True to use snapshot()/aux_loss()"
            )

    @torch.no_grad()
    def snapshot(self, task: str) -> None:
        """Record θ'_task after ``task``'s turn (JMT); :meth:`aux_loss` then returns the term
        for the task trained next (see the class docstring)."""
        self._require_sr()
        t = self.check_task(task)
        scope = _EMBEDDING_ONLY if t == self.order[-1] else self.tasks.index(t)
        self.sr_scope.fill_(scope)
        for p, snap, _ in self._scope(scope):
            snap.copy_(p.detach())

    def clear_snapshot(self) -> None:
        """Drop the current snapshot: :meth:`aux_loss` returns ``None`` until the next one."""
        self._require_sr()
        self.sr_scope.fill_(_NO_SNAPSHOT)

    def aux_loss(self) -> Tensor | None:
        """JMT's successive regularisation term ``δ‖θ − θ'‖²`` for the current snapshot
        (``None`` without successive regularisation or before the first snapshot)."""
        if not self.successive_regularization:
            return None
        terms = [
            c * (p - snap).pow(2).sum() for p, snap, c in self._scope(int(self.sr_scope)) if c > 0
        ]
        if not terms:
            return None
        return torch.stack(terms).sum()
