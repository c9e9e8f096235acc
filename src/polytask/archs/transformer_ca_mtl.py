"""CA-MTL: a transformer whose attention, layer norms and adapter are conditioned on a task
embedding."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.transformer_blocks import (
    FiLM,
    Pooler,
    TextEncoder,
    check_positive,
    check_tokens,
    per_task,
)
from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = [
    "CAMTL",
    "ConditionalAttention",
    "ConditionalBlockDiagonal",
    "ConditionalBottleneck",
    "ConditionalLayerNorm",
]


class ConditionalBlockDiagonal(nn.Module):
    """The attention bias ``M(z) = block_diag(A'_1(z), ..., A'_N(z))`` of CA-MTL.

    One shared matrix ``A`` [L, L/N] (L = max_len) is FiLM-modulated along its columns by
    the task embedding, ``A'(z) = (1 + gamma(z)) * A + beta(z)``, cut into N row blocks
    [L/N, L/N] and laid on the diagonal of an [L, L] matrix; a sequence of length l < L uses
    its top-left l x l corner. ``A`` starts at zero as in the official code.
    """

    def __init__(self, cond_dim: int, max_len: int, num_blocks: int) -> None:
        super().__init__()
        check_positive(max_len=max_len, num_blocks=num_blocks)
        if max_len % num_blocks:
            raise InvalidHyperparameterError(
                f"max_len={max_len} must be divisible by num_blocks={num_blocks}"
            )
        self.max_len, self.num_blocks = max_len, num_blocks
        self.weight = nn.Parameter(torch.zeros(max_len, max_len // num_blocks))
        self.film = FiLM(cond_dim, max_len // num_blocks)

    def forward(self, z: Tensor, length: int) -> Tensor:
        if length > self.max_len:
            raise PolytaskError(f"sequence length {length} exceeds max_len={self.max_len}")
        blocks = self.film(z, self.weight).chunk(self.num_blocks, dim=0)
        return torch.block_diag(*blocks)[:length, :length]


class ConditionalAttention(nn.Module):
    """Multi-head self-attention ``softmax(Q K^T / sqrt(d_h) + M(z)) V`` (CA-MTL eq. 2)."""

    def __init__(
        self, d_model: int, num_heads: int, max_len: int, num_blocks: int, dropout: float
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise InvalidHyperparameterError(
                f"d_model={d_model} must be divisible by num_heads={num_heads}"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.bias = ConditionalBlockDiagonal(d_model, max_len, num_blocks)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        b, length, d = h.shape
        q, k, v = self.qkv(h).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        attn = self.dropout((scores + self.bias(z, length)).softmax(dim=-1))
        return (attn @ v).transpose(1, 2).reshape(b, length, d)


class ConditionalLayerNorm(nn.Module):
    """Layer norm whose scale is FiLM-modulated by the task embedding.

    ``y = (x - mean) / std * ((1 + gamma(z)) * w + beta(z)) + b``: as in the official code the
    learned scale ``w`` is modulated and the bias ``b`` is not (the paper's eq. writes
    ``gamma(z) * x_hat + beta(z)``).
    """

    def __init__(self, d_model: int, cond_dim: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.film = FiLM(cond_dim, d_model)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.film(z, self.weight), self.bias, self.eps)


class ConditionalBottleneck(nn.Module):
    """CA-MTL's conditional adapter: ``Up(Down(FiLM(W z, h)))`` with a d/3 bottleneck and,
    as in the official code, no non-linearity between the two projections."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.cond = nn.Linear(d_model, d_model)
        self.film = FiLM(d_model, d_model)
        self.down = nn.Linear(d_model, max(1, d_model // 3))
        self.up = nn.Linear(max(1, d_model // 3), d_model)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        return self.up(self.down(self.film(self.cond(z), h)))


class _Layer(nn.Module):
    """A post-LN BERT layer with conditional attention, optionally conditional layer norms
    and the conditional adapter."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        max_len: int,
        num_blocks: int,
        dropout: float,
        conditional_norm: bool,
        adapter: bool,
    ) -> None:
        super().__init__()
        self.attention = ConditionalAttention(d_model, num_heads, max_len, num_blocks, dropout)
        self.attn_out = nn.Linear(d_model, d_model)
        self.ffn_in = nn.Linear(d_model, dim_feedforward)
        self.ffn_out = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.conditional_norm = conditional_norm
        if conditional_norm:
            self.norm1 = ConditionalLayerNorm(d_model, d_model)
            self.norm2 = ConditionalLayerNorm(d_model, d_model)
        else:
            self.norm1 = nn.LayerNorm(d_model, eps=1e-12)
            self.norm2 = nn.LayerNorm(d_model, eps=1e-12)
        self.adapter = ConditionalBottleneck(d_model) if adapter else None
        self.adapter_norm = ConditionalLayerNorm(d_model, d_model) if adapter else None

    def _norm(self, norm: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        return norm(x, z) if self.conditional_norm else norm(x)

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        a = self.dropout(self.attn_out(self.attention(h, z)))
        a = self._norm(self.norm1, h + a, z)
        out = self.dropout(self.ffn_out(F.gelu(self.ffn_in(a))))
        out = self._norm(self.norm2, a + out, z)
        if self.adapter is not None:
            # Official code: the adapter's residual is the attention output, not the layer input.
            out = self.adapter_norm(self.adapter(out, z) + a, z)
        return out


@register("ca_mtl")
class CAMTL(MultiTaskModel):
    """CA-MTL: one transformer conditioned on a learned task embedding z_t.

    Pilault, Elhattami & Pal, "Conditionally Adaptive Multi-Task Learning: Improving Transfer
    Learning in NLP Using Fewer Parameters & Less Data", ICLR 2021. Structure of the official
    CA-MTL-base encoder, built here on ``num_layers`` layers:

    - conditional alignment: ``FiLM(z_t)`` on the input embeddings;
    - conditional attention in every layer: ``softmax(QK^T/sqrt(d) + M(z))V`` with the
      block-diagonal ``M(z)`` of :class:`ConditionalBlockDiagonal` (``num_blocks`` blocks);
    - conditional layer norm (:class:`ConditionalLayerNorm`) in the top half of the layers;
    - the conditional bottleneck adapter (:class:`ConditionalBottleneck`) in the last layer;
    - z = W z_t (a shared linear "task transformation") conditions the layers;
    - a shared BERT pooler on [CLS] and one dropout + linear output layer per task.

    Parameters: each task owns its embedding z_t and its output layer; everything else
    (including every FiLM generator, which is a hypernetwork shared by all tasks) is shared.

    Args:
        tasks: task names or K.
        embedding: input -> token vectors [B, L, d_model] (e.g. pretrained BERT embeddings);
            default BERT-style embeddings (:class:`TextEncoder` with no layers): token ids
            with ``vocab_size``, else token vectors [B, L, d_model].
        d_model, num_heads, dim_feedforward (default 4 d_model): layer sizes; the paper uses
            BERT-base (768, 12, 3072) with 12 layers; default small (32, 4, 128) with 4.
        num_layers: >= 2; bottom ``num_layers // 2`` layers have conditional attention only.
        max_len: longest sequence (the official code pads every input to it; here shorter
            inputs use the top-left corner of M(z)).
        num_blocks: N, blocks of M(z); must divide max_len. The official code ties it to
            ``d_model // max_len`` (6 for BERT-base at length 128).
        num_classes: outputs of each task's layer (a value, a list or a dict; default 2).
        dropout: BERT's 0.1.
    Needs: nothing beyond the task losses.

    Not included: the paper's multi-task uncertainty sampling (a data sampler, not part of
    the network), and loading BERT weights into the bottom half and freezing it (pass your
    own ``embedding`` and freeze parameters with ``requires_grad_(False)``).
    """

    paper: ClassVar[str] = (
        "Pilault, Elhattami & Pal, Conditionally Adaptive Multi-Task Learning: Improving "
        "Transfer Learning in NLP Using Fewer Parameters & Less Data, ICLR 2021"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        *,
        embedding: nn.Module | None = None,
        d_model: int = 32,
        num_heads: int = 4,
        num_layers: int = 4,
        dim_feedforward: int | None = None,
        max_len: int = 64,
        num_blocks: int = 4,
        num_classes: int | Sequence[int] | Mapping[str, int] = 2,
        dropout: float = 0.1,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(tasks)
        check_positive(d_model=d_model, num_heads=num_heads, max_len=max_len)
        if not isinstance(num_layers, int) or num_layers < 2:
            raise InvalidHyperparameterError(
                f"num_layers={num_layers!r} must be >= 2 (a bottom half and a top half)"
            )
        if not 0.0 <= dropout < 1.0:
            raise InvalidHyperparameterError(f"dropout={dropout} must be in [0, 1)")
        classes = per_task(num_classes, self.tasks, "num_classes")
        for t, c in zip(self.tasks, classes):
            check_positive(**{f"num_classes[{t!r}]": c})
        self.d_model = d_model
        self.embedding = embedding or TextEncoder(
            d_model, num_layers=0, num_heads=num_heads, vocab_size=vocab_size, max_len=max_len
        )
        self.task_embeddings = nn.ParameterDict(
            {t: nn.Parameter(torch.randn(d_model) * 0.02) for t in self.tasks}
        )
        self.alignment = FiLM(d_model, d_model)
        self.task_transformation = nn.Linear(d_model, d_model)
        bottom = num_layers // 2
        self.layers = nn.ModuleList(
            _Layer(
                d_model,
                num_heads,
                dim_feedforward or 4 * d_model,
                max_len,
                num_blocks,
                dropout,
                conditional_norm=i >= bottom,
                adapter=i == num_layers - 1,
            )
            for i in range(num_layers)
        )
        self.pooler = Pooler(d_model)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, c) for t, c in zip(self.tasks, classes)})

    def hidden_states(self, x: Any, task: str, *, embedded: Tensor | None = None) -> Tensor:
        """The task-conditioned token vectors [B, L, d_model] of the last layer for ``task``
        (``embedded``: the embedding output, when already computed for another task)."""
        z_t = self.task_embeddings[self.check_task(task)]
        if embedded is None:
            embedded = check_tokens(self.embedding(x), self.d_model, "CAMTL embedding output")
        h = self.alignment(z_t, embedded)
        z = self.task_transformation(z_t)
        for layer in self.layers:
            h = layer(h, z)
        return h

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        names = self.tasks if task is None else (self.check_task(task),)
        # The embeddings are not task-conditioned: compute them once for all tasks.
        e = check_tokens(self.embedding(x), self.d_model, "CAMTL embedding output")
        out = {
            t: self.heads[t](self.dropout(self.pooler(self.hidden_states(x, t, embedded=e))))
            for t in names
        }
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        yield self.task_embeddings[task]
        yield from self.heads[task].parameters()
