"""Building blocks shared by the transformer architectures (MT-DNN, CA-MTL, HyperGrid, ...).

Nothing here is registered: these are the small default encoder, the BERT-style pooler,
FiLM, input checks and head builders that the registered transformer architectures share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = [
    "FiLM",
    "Pooler",
    "TextEncoder",
    "check_positive",
    "check_tokens",
    "per_task",
]

T = TypeVar("T")


def check_positive(**values: int) -> None:
    """Raise :class:`InvalidHyperparameterError` for any non-positive integer argument."""
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidHyperparameterError(f"{name}={v!r} must be a positive integer")


def check_tokens(h: Tensor, d_model: int, owner: str) -> Tensor:
    """``h`` if it is a float [B, L, d_model] sequence of token vectors, else a clear error."""
    if not isinstance(h, Tensor) or h.dim() != 3 or h.shape[-1] != d_model:
        shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise PolytaskError(
            f"{owner} expects token vectors of shape [batch, length, {d_model}], got {shape}; "
            "pass an `embedding`/`encoder` module that maps your input to that shape"
        )
    if not h.is_floating_point():
        raise PolytaskError(
            f"{owner} got integer tokens of shape {tuple(h.shape)}; give it an embedding module "
            "(e.g. TextEncoder(vocab_size=...)) that maps token ids to vectors"
        )
    return h


def per_task(value: T | Sequence[T] | Mapping[str, T], tasks: Sequence[str], name: str) -> list[T]:
    """One value per task from a scalar, a sequence in task order, or a {task: value} mapping."""
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        extra = [k for k in value if k not in tasks]
        if missing or extra:
            raise InvalidHyperparameterError(
                f"{name} must have one entry per task {list(tasks)}; missing {missing}, "
                f"unknown {extra}"
            )
        return [value[t] for t in tasks]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(tasks):
            raise InvalidHyperparameterError(
                f"{name} has {len(value)} entries for {len(tasks)} tasks {list(tasks)}"
            )
        return list(value)
    return [value for _ in tasks]  # type: ignore[misc]


class FiLM(nn.Module):
    """Feature-wise linear modulation ``(1 + gamma(z)) * x + beta(z)`` (Perez et al., AAAI 2018).

    ``gamma`` and ``beta`` are one linear map of the conditioning vector ``z``; its bias starts
    at zero so that FiLM starts near the identity, as in CA-MTL's official code.
    """

    def __init__(self, cond_dim: int, features: int) -> None:
        super().__init__()
        self.features = features
        self.proj = nn.Linear(cond_dim, 2 * features)
        nn.init.zeros_(self.proj.bias)

    def gamma_beta(self, z: Tensor) -> tuple[Tensor, Tensor]:
        gamma, beta = self.proj(z).chunk(2, dim=-1)
        return gamma, beta

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        gamma, beta = self.gamma_beta(z)
        return (1 + gamma) * x + beta


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(W h_[CLS] + b)`` on the first token (Devlin et al., NAACL 2019)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class TextEncoder(nn.Module):
    """A small BERT-like encoder: embeddings + post-LN ``nn.TransformerEncoder`` layers.

    With ``vocab_size`` it reads token ids [B, L] (token 0 of each row plays [CLS]); without,
    it reads token vectors [B, L, d_model]. Learned positions up to ``max_len``. Returns the
    contextual token vectors [B, L, d_model].
    """

    def __init__(
        self,
        d_model: int = 32,
        *,
        num_layers: int = 2,
        num_heads: int = 4,
        dim_feedforward: int | None = None,
        dropout: float = 0.1,
        vocab_size: int | None = None,
        max_len: int = 128,
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, num_heads=num_heads, max_len=max_len)
        if not isinstance(num_layers, int) or num_layers < 0:
            raise InvalidHyperparameterError(f"num_layers={num_layers!r} must be >= 0")
        if d_model % num_heads:
            raise InvalidHyperparameterError(
                f"d_model={d_model} must be divisible by num_heads={num_heads}"
            )
        self.d_model, self.max_len = d_model, max_len
        self.tokens = None if vocab_size is None else nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                num_heads,
                dim_feedforward or 4 * d_model,
                dropout,
                activation="gelu",
                batch_first=True,
            )
            for _ in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.tokens is not None:
            if x.dim() != 2 or x.is_floating_point():
                raise PolytaskError(
                    f"TextEncoder(vocab_size=...) expects token ids [batch, length], got "
                    f"{x.dtype} of shape {tuple(x.shape)}"
                )
            h = self.tokens(x)
        else:
            h = check_tokens(x, self.d_model, "TextEncoder")
        length = h.shape[1]
        if length > self.max_len:
            raise PolytaskError(f"sequence length {length} exceeds max_len={self.max_len}")
        h = h + self.positions(torch.arange(length, device=h.device))
        h = self.dropout(self.norm(h))
        for layer in self.layers:
            h = layer(h)
        return h
