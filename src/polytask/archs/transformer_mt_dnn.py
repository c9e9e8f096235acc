"""MT-DNN: one shared transformer encoder, one small output layer per task on the [CLS] vector."""

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
from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = ["MTDNN", "listwise_ranking_loss"]

TASK_TYPES = ("classification", "regression", "ranking")


def listwise_ranking_loss(scores: Tensor, positive: Tensor, gamma: float = 1.0) -> Tensor:
    """MT-DNN's relevance-ranking loss: ``-mean_q log softmax(gamma * Rel(q, .))[A+_q]``.

    Args:
        scores: [Q, n] relevance scores ``Rel(Q, A)`` of n candidate answers per query (the
            ranking head's outputs for the Q*n (query, candidate) pairs, reshaped).
        positive: [Q] index of the relevant candidate of each query.
        gamma: the softmax temperature factor (the paper sets it to 1).
    """
    if scores.dim() != 2 or positive.shape != scores.shape[:1]:
        raise PolytaskError(
            f"scores must be [queries, candidates] and positive [queries]; got "
            f"{tuple(scores.shape)} and {tuple(positive.shape)}"
        )
    return F.cross_entropy(gamma * scores, positive)


class _Head(nn.Module):
    def __init__(self, kind: str, d_model: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, num_classes if kind == "classification" else 1)

    def forward(self, pooled: Tensor) -> Tensor:
        y = self.out(self.dropout(pooled))
        if self.kind == "classification":
            return y
        y = y.squeeze(-1)
        return torch.sigmoid(y) if self.kind == "ranking" else y


@register("mt_dnn")
class MTDNN(MultiTaskModel):
    """MT-DNN: a shared transformer encoder with task-specific output layers on [CLS].

    Liu, He, Chen & Gao, "Multi-Task Deep Neural Networks for Natural Language
    Understanding", ACL 2019. The lexicon and transformer encoders (BERT in the paper) are
    shared; the contextual vector x of the first token ([CLS]), passed through BERT's pooler
    ``tanh(W x + b)`` as in the official code, feeds one output layer per task type:

    - ``"classification"``: logits ``W_t^T x`` [B, num_classes] (softmax/cross-entropy outside);
    - ``"regression"`` (text similarity): ``w_t^T x`` [B];
    - ``"ranking"`` (relevance): ``Rel(Q, A) = sigmoid(w_t^T x)`` [B] per (query, answer)
      pair, trained with :func:`listwise_ranking_loss` over each query's candidates.

    Args:
        tasks: task names or K.
        encoder: the shared encoder, input -> token vectors [B, L, hidden_size] (e.g. a
            pretrained BERT); default a small :class:`TextEncoder` (2 layers, 4 heads).
        hidden_size: width of the encoder's output (default 32, the small default encoder).
        task_types: one of ``classification | regression | ranking``, per task (a value, a
            list in task order or a dict); default classification.
        num_classes: output classes of each classification task (default 2).
        dropout: dropout before each output layer (paper: 0.1, except 0.3 MNLI, 0.05 CoLA).
        vocab_size: give the default encoder a token embedding (input token ids [B, L]);
            without it the default encoder reads token vectors [B, L, hidden_size].
        num_layers, num_heads: size of the default encoder.
    Needs: nothing beyond the task losses; :meth:`encode` returns the pooled [CLS] vector.

    Departures: the paper's pairwise text classification uses the stochastic answer network
    (SAN, multi-step reasoning over premise/hypothesis tokens); here it uses the
    classification head on [CLS], as the official GLUE task definitions do
    (``enable_san: false``). The ranking head keeps the paper's sigmoid; the official code
    feeds the raw linear scores to the listwise softmax.
    """

    paper: ClassVar[str] = (
        "Liu, He, Chen & Gao, Multi-Task Deep Neural Networks for Natural Language "
        "Understanding, ACL 2019"
    )
    has_shared_representation: ClassVar[bool] = True

    def __init__(
        self,
        tasks: Sequence[str] | int,
        *,
        encoder: nn.Module | None = None,
        hidden_size: int = 32,
        task_types: str | Sequence[str] | Mapping[str, str] = "classification",
        num_classes: int | Sequence[int] | Mapping[str, int] = 2,
        dropout: float = 0.1,
        vocab_size: int | None = None,
        num_layers: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__(tasks)
        check_positive(hidden_size=hidden_size)
        kinds = per_task(task_types, self.tasks, "task_types")
        classes = per_task(num_classes, self.tasks, "num_classes")
        for t, kind, c in zip(self.tasks, kinds, classes):
            if kind not in TASK_TYPES:
                raise InvalidHyperparameterError(
                    f"task_types[{t!r}]={kind!r}; choose one of {', '.join(TASK_TYPES)}"
                )
            check_positive(**{f"num_classes[{t!r}]": c})
        if not 0.0 <= dropout < 1.0:
            raise InvalidHyperparameterError(f"dropout={dropout} must be in [0, 1)")
        self.hidden_size = hidden_size
        self.task_types = dict(zip(self.tasks, kinds))
        self.encoder = encoder or TextEncoder(
            hidden_size, num_layers=num_layers, num_heads=num_heads, vocab_size=vocab_size
        )
        self.pooler = Pooler(hidden_size)
        self.heads = nn.ModuleDict(
            {t: _Head(k, hidden_size, c, dropout) for t, k, c in zip(self.tasks, kinds, classes)}
        )

    def encode(self, x: Any) -> Tensor:
        h = check_tokens(self.encoder(x), self.hidden_size, "MTDNN encoder output")
        return self.pooler(h)

    def decode(self, features: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            return self.heads[self.check_task(task)](features)
        return {t: self.heads[t](features) for t in self.tasks}

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        return self.decode(self.encode(x), task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        yield from self.heads[self.check_task(task)].parameters()
