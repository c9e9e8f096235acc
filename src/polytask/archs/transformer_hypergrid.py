"""HyperGrid: a transformer whose feed-forward weights are gated, block by block, by a
task-conditioned hypernetwork."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.transformer_blocks import (
    Pooler,
    TextEncoder,
    check_positive,
    check_tokens,
    per_task,
)
from polytask.errors import InvalidHyperparameterError

__all__ = ["GridGate", "HyperGrid"]

MODES = ("lg", "gl", "ll", "gg")


class GridGate(nn.Module):
    """The grid-wise gate ``psi(sigmoid(r c^T))`` of an [out, in] weight matrix.

    ``r`` [rows] and ``c`` [cols] are each either *local* (a linear map of the task embedding,
    task-conditioned) or *global* (a learned vector, task-agnostic): ``mode`` names them in
    that order, e.g. ``"lg"`` = local rows x global columns. ``psi`` expands the [rows, cols]
    grid to [out, in] by repeating each entry over an (out/rows) x (in/cols) block, so every
    block of the weight matrix gets one gate value.
    """

    def __init__(
        self, task_dim: int, out_features: int, in_features: int, grid: tuple[int, int], mode: str
    ) -> None:
        super().__init__()
        rows, cols = grid
        check_positive(grid_rows=rows, grid_cols=cols)
        if out_features % rows or in_features % cols:
            raise InvalidHyperparameterError(
                f"grid={grid} must divide the gated weight's shape ({out_features}, "
                f"{in_features}); choose a grid whose sizes divide it"
            )
        if mode not in MODES:
            raise InvalidHyperparameterError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.grid = mode, (rows, cols)
        self.block = (out_features // rows, in_features // cols)
        self.rows = nn.Linear(task_dim, rows) if mode[0] == "l" else nn.Parameter(torch.randn(rows))
        self.cols = nn.Linear(task_dim, cols) if mode[1] == "l" else nn.Parameter(torch.randn(cols))

    @staticmethod
    def _vector(part: nn.Module | Tensor, z: Tensor | None) -> Tensor:
        return part(z) if isinstance(part, nn.Module) else part

    def grid_values(self, z: Tensor | None) -> Tensor:
        """The [rows, cols] gate grid for task embedding ``z`` (unused in ``"gg"`` mode)."""
        r, c = self._vector(self.rows, z), self._vector(self.cols, z)
        return torch.sigmoid(torch.outer(r, c))

    def forward(self, z: Tensor | None) -> Tensor:
        g = self.grid_values(z)
        return g.repeat_interleave(self.block[0], 0).repeat_interleave(self.block[1], 1)


class _Layer(nn.Module):
    """A pre-LN transformer layer whose FFN output weight is gated by :class:`GridGate`."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_ff: int,
        dropout: float,
        task_dim: int,
        grid: tuple[int, int],
        mode: str,
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout, batch_first=True)
        self.ffn_in = nn.Linear(d_model, dim_ff)
        self.ffn_out = nn.Linear(dim_ff, d_model)
        self.gate = GridGate(task_dim, d_model, dim_ff, grid, mode)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, z: Tensor | None) -> Tensor:
        a = self.norm1(h)
        h = h + self.dropout(self.attention(a, a, a, need_weights=False)[0])
        u = F.relu(self.ffn_in(self.norm2(h)))
        weight = self.ffn_out.weight * self.gate(z)
        return h + self.dropout(F.linear(u, weight, self.ffn_out.bias))


@register("hypergrid")
class HyperGrid(MultiTaskModel):
    """HyperGrid Transformer: task-conditioned grid-wise gating of the FFN weights.

    Tay, Zhao, Bahri, Metzler & Juan, "HyperGrid Transformers: Towards A Single Model for
    Multiple Tasks", ICLR 2021. In every layer the FFN output weight W [d_model, d_ff] is
    replaced by ``W * psi(sigmoid(r c^T))`` (:class:`GridGate`): a [rows, cols] grid of gates,
    each gating one block of W, built as the outer product of a local (task-conditioned) and
    a global (task-agnostic) vector, so that regions of W specialise per task. The local
    vectors are linear maps of the task embedding; these maps and the global vectors form
    the hypernetwork, shared by all tasks.

    Parameters: each task owns its embedding (``task_dim``) and its output layer on the
    pooled first token; everything else is shared.

    Args:
        tasks: task names or K.
        embedding: input -> token vectors [B, L, d_model]; default learned token/position
            embeddings (:class:`TextEncoder` with no layers; token ids with ``vocab_size``).
        d_model, num_heads, num_layers, dim_feedforward (default 4 d_model): transformer
            size (the paper: T5-base; default small 32, 4, 2, 128).
        grid: (rows, cols) of the gate grid; must divide (d_model, dim_feedforward).
            Default (d_model // 4, dim_feedforward // 16), i.e. 4 x 16 blocks (ours: a small
            default, the paper sweeps the block size).
        mode: which of rows/cols is local (l) or global (g): ``lg`` (default), ``gl``,
            ``ll``; ``gg`` has no task conditioning (a static grid, no task embedding).
        task_dim: size of the task embedding (default d_model).
        num_classes: outputs of each task's layer (default 2).
        dropout: 0.1.
    Needs: nothing beyond the task losses.

    Departures: the paper conditions on the embedded task prefix of a T5 encoder-decoder and
    decodes text; here the task vector is a learned embedding per task and each task has a
    classification/regression layer on the pooled first token of an encoder. The layers are
    pre-LN with ReLU FFNs (as T5) with LayerNorm instead of T5's RMS norm. No official code
    is public: the gate follows the paper's description (sigmoid of the local x global outer
    product, block-expanded, multiplying W), not a reference implementation.
    """

    paper: ClassVar[str] = (
        "Tay, Zhao, Bahri, Metzler & Juan, HyperGrid Transformers: Towards A Single Model "
        "for Multiple Tasks, ICLR 2021"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        *,
        embedding: nn.Module | None = None,
        d_model: int = 32,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int | None = None,
        grid: tuple[int, int] | None = None,
        mode: str = "lg",
        task_dim: int | None = None,
        num_classes: int | Sequence[int] | Mapping[str, int] = 2,
        dropout: float = 0.1,
        vocab_size: int | None = None,
        max_len: int = 128,
    ) -> None:
        super().__init__(tasks)
        check_positive(d_model=d_model, num_heads=num_heads, num_layers=num_layers)
        if not 0.0 <= dropout < 1.0:
            raise InvalidHyperparameterError(f"dropout={dropout} must be in [0, 1)")
        dim_ff = dim_feedforward or 4 * d_model
        grid = grid or (max(1, d_model // 4), max(1, dim_ff // 16))
        task_dim = task_dim or d_model
        classes = per_task(num_classes, self.tasks, "num_classes")
        for t, c in zip(self.tasks, classes):
            check_positive(**{f"num_classes[{t!r}]": c})
        self.d_model, self.mode = d_model, mode
        self.embedding = embedding or TextEncoder(
            d_model, num_layers=0, num_heads=num_heads, vocab_size=vocab_size, max_len=max_len
        )
        self.layers = nn.ModuleList(
            _Layer(d_model, num_heads, dim_ff, dropout, task_dim, tuple(grid), mode)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(task_dim)) for t in self.tasks} if "l" in mode else {}
        )
        self.pooler = Pooler(d_model)
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, c) for t, c in zip(self.tasks, classes)})

    def hidden_states(self, x: Any, task: str, *, embedded: Tensor | None = None) -> Tensor:
        """The token vectors [B, L, d_model] after the layers gated for ``task``
        (``embedded``: the embedding output, when already computed for another task)."""
        self.check_task(task)
        z = self.task_embeddings[task] if "l" in self.mode else None
        h = embedded
        if h is None:
            h = check_tokens(self.embedding(x), self.d_model, "HyperGrid embedding output")
        for layer in self.layers:
            h = layer(h, z)
        return self.norm(h)

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        names = self.tasks if task is None else (self.check_task(task),)
        e = check_tokens(self.embedding(x), self.d_model, "HyperGrid embedding output")
        out = {t: self.heads[t](self.pooler(self.hidden_states(x, t, embedded=e))) for t in names}
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        if "l" in self.mode:
            yield self.task_embeddings[task]
        yield from self.heads[task].parameters()
