"""Sluice networks: cross-stitching over channel subspaces, layer mixing, orthogonal subspaces."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import (
    ModuleSpec,
    StagesSpec,
    check_positions,
    per_task_modules,
    per_task_stages,
)
from polytask.archs.soft_sharing._stitch import StitchUnit, imbalanced_matrix
from polytask.errors import InvalidHyperparameterError

__all__ = ["Sluice"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register("sluice")
class Sluice(MultiTaskModel):
    """Sluice network: α units over subspaces, β layer mixing, orthogonal subspaces.

    Ruder, Bingel, Augenstein & Søgaard, "Latent Multi-task Architecture Learning", AAAI
    2019. One column per task (the user's stages, copied per task). Each stitched stage's
    output is split along channels into M subspaces; an α unit ([K·M, K·M]) mixes every
    task's subspaces into every task's next input (``x̃_{t,m} = Σ_{s,n} α_{(t,m),(s,n)}
    x_{s,n}``). A β unit per task mixes the (α-mixed) outputs of the stages in
    ``beta_layers`` into the head's input, ``h_t = Σ_l β_{t,l} x̃_t^{(l)}``, so a task can
    read lower layers (the paper's hierarchical relations). :meth:`aux_loss` returns the
    subspace orthogonality penalty ``λ Σ_{t,k} Σ_{i<j} ||G_{t,k,i}ᵀ G_{t,k,j}||_F²``.

    Hyper-parameters (paper/official defaults):
        subspaces: M = 2 subspaces per stitched layer (the paper's sluice network).
        alpha_init: ``"balanced"`` (every entry 1/(K·M), the official default) or
            ``"imbalanced"`` (subspace m of task t reads subspace m of every task, with
            ``alpha_self`` = 0.9 from its own task and ``alpha_other`` = 0.1/(K-1) from each
            other; the official code's M=1 scheme, carried over to M subspaces; its M=2
            pattern is specific to its DyNet memory layout and not reproduced).
        beta_init: ``"imbalanced"`` (0.9 on the last mixed layer, 0.1/(L-1) on the others,
            the official default) or ``"balanced"`` (1/L each).
        stitch_after: stages followed by an α unit (default every stage, as in the paper).
        beta_layers: stages whose outputs β mixes (default every stage); their outputs must
            have one shape (the paper's LSTM layers all have the hidden size).
        orthogonality_weight: λ. The paper does not fix it (the official command line has 0,
            off); 1.0 here so the constraint is active by default. Tune it.

    Departure: ``G_{t,k,i}`` is the weight of the stitched stage's last linear/conv layer
    restricted to the output units of subspace i, one column per unit (the official code
    constrains the LSTM weight matrices); the penalty is zero exactly when every unit of one
    subspace has weights orthogonal to every unit of another. The stage must end in such a
    layer (followed only by norm/activation layers) when λ > 0.

    Args:
        tasks: task names or their number K.
        stages: the network as a list of stages (copied per task), a ``factory(task)``
            returning one, or ``{task: stages}``; features are [B, C, ...], C divisible by M.
        heads: each task's head on the β mixture (module copied per task,
            ``factory(task)``, or ``{task: module}``).

    Parameters of a task: its head and β, its column's stages after the last α unit, and
    its rows of the last α unit.
    """

    paper = (
        "Ruder, Bingel, Augenstein & Søgaard, Latent Multi-task Architecture Learning, AAAI 2019"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: StagesSpec,
        heads: ModuleSpec,
        *,
        subspaces: int = 2,
        stitch_after: Sequence[int] | None = None,
        beta_layers: Sequence[int] | None = None,
        alpha_init: str = "balanced",
        alpha_self: float = 0.9,
        alpha_other: float | None = None,
        beta_init: str = "imbalanced",
        orthogonality_weight: float = 1.0,
    ) -> None:
        super().__init__(tasks)
        if isinstance(subspaces, bool) or not isinstance(subspaces, int) or subspaces < 1:
            raise InvalidHyperparameterError(f"subspaces={subspaces!r} must be an int >= 1")
        if orthogonality_weight < 0:
            raise InvalidHyperparameterError(
                f"orthogonality_weight={orthogonality_weight} must be >= 0"
            )
        self.subspaces = subspaces
        self.orthogonality_weight = float(orthogonality_weight)
        self.columns = per_task_stages(self.tasks, stages, "stages")
        self.heads = per_task_modules(self.tasks, heads, "heads")
        num_stages = len(self.columns[self.tasks[0]])
        self.stitch_after = check_positions(stitch_after, num_stages, "stitch_after")
        self.beta_layers = check_positions(beta_layers, num_stages, "beta_layers")

        k, m = self.num_tasks, subspaces
        if alpha_init == "balanced":
            init = torch.full((k * m, k * m), 1.0 / (k * m))
        elif alpha_init == "imbalanced":
            other = alpha_other if alpha_other is not None else (0.1 / (k - 1) if k > 1 else 0.0)
            init = imbalanced_matrix(k, m, alpha_self, other)
        else:
            raise InvalidHyperparameterError(
                f"alpha_init={alpha_init!r}; use 'balanced' or 'imbalanced'"
            )
        self.units = nn.ModuleDict(
            {str(i): StitchUnit(self.tasks, m, init) for i in self.stitch_after}
        )

        n = len(self.beta_layers)
        if beta_init == "imbalanced" and n > 1:
            beta = torch.full((n,), 0.1 / (n - 1))
            beta[-1] = 0.9
        elif beta_init in ("imbalanced", "balanced"):
            beta = torch.full((n,), 1.0 / n)
        else:
            raise InvalidHyperparameterError(
                f"beta_init={beta_init!r}; use 'imbalanced' or 'balanced'"
            )
        self.betas = nn.ParameterDict({t: nn.Parameter(beta.clone()) for t in self.tasks})

        self._constrained: dict[str, list[nn.Module]] = {}
        if self.orthogonality_weight > 0:
            if m < 2:
                raise InvalidHyperparameterError(
                    "the orthogonality constraint needs subspaces >= 2; "
                    "set orthogonality_weight=0 for subspaces=1"
                )
            for t in self.tasks:
                self._constrained[t] = [
                    _last_weighted(self.columns[t][i], i, m) for i in self.stitch_after
                ]

    def alphas(self) -> dict[int, Tensor]:
        """Each α unit's full [K·M, K·M] matrix, keyed by the stage it follows."""
        return {int(i): unit.matrix() for i, unit in self.units.items()}

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        last = self.stitch_after[-1]
        feats = {t: x for t in self.tasks}
        collected: dict[str, list[Tensor]] = {t: [] for t in wanted}
        for i in range(len(self.columns[self.tasks[0]])):
            alive = self.tasks if i <= last else wanted
            feats = {t: self.columns[t][i](feats[t]) for t in alive}
            if str(i) in self.units:
                feats = self.units[str(i)](feats, wanted if i == last else None)
            if i in self.beta_layers:
                for t in wanted:
                    collected[t].append(feats[t])
        out = {}
        for t in wanted:
            layers = collected[t]
            shapes = {tuple(h.shape) for h in layers}
            if len(shapes) != 1:
                raise ValueError(
                    f"beta mixes the outputs of stages {self.beta_layers}, which have different "
                    f"shapes {[tuple(h.shape) for h in layers]}; pass beta_layers= with stages "
                    "of one shape"
                )
            mixed = torch.einsum("l,lb...->b...", self.betas[t], torch.stack(layers))
            out[t] = self.heads[t](mixed)
        return self._select(out, task)

    def aux_loss(self) -> Tensor | None:
        """λ times the subspace orthogonality penalty (``None`` when λ = 0)."""
        if not self._constrained:
            return None
        m = self.subspaces
        total = []
        for layers in self._constrained.values():
            for layer in layers:
                w = layer.weight
                if isinstance(layer, nn.Linear):
                    units = w  # [C, fan_in]
                else:
                    units = w.reshape(w.shape[0], -1)
                chunks = units.chunk(m, dim=0)
                for a in range(m):
                    for b in range(a + 1, m):
                        total.append((chunks[a] @ chunks[b].T).pow(2).sum())
        return self.orthogonality_weight * torch.stack(total).sum()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        last = self.stitch_after[-1]
        yield from self.heads[task].parameters()
        yield self.betas[task]
        for stage in list(self.columns[task])[last + 1 :]:
            yield from stage.parameters()
        yield self.units[str(last)].rows[task]


def _last_weighted(stage: nn.Module, index: int, subspaces: int) -> nn.Module:
    """The stage's last linear/conv layer, whose output units form the subspaces."""
    for module in reversed(list(stage.modules())):
        if isinstance(module, _WEIGHTED):
            out = module.weight.shape[0]
            if out % subspaces:
                raise ValueError(
                    f"stage {index}'s last layer has {out} output units, not divisible into "
                    f"{subspaces} subspaces"
                )
            return module
    raise ValueError(
        f"stage {index} has no linear/conv layer to constrain; pass orthogonality_weight=0 "
        "or make the stage end in a linear/conv layer (norm/activation after it is fine)"
    )
