"""A small pre-LN Transformer encoder for token or feature sequences."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from polytask.archs.backbones._registry import register_backbone
from polytask.archs.backbones.mlp import make_activation

__all__ = ["TransformerBlock", "TransformerEncoder", "sinusoidal_positions", "transformer_encoder"]


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """Vaswani et al.'s fixed encodings: ``PE[p, 2i] = sin(p / 10000^(2i/d))``,
    ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``; ``[length, dim]``."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return pe.float()


class TransformerBlock(nn.Module):
    """Pre-LN Transformer block: ``x + Attn(LN(x))``, then ``x + FFN(LN(x))``."""

    def __init__(
        self, dim: int, num_heads: int, ffn_dim: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        h, _ = self.attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)
        x = x + self.dropout(h)
        return x + self.dropout(self.ffn(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """A small Transformer encoder (Vaswani et al., "Attention Is All You Need", NeurIPS 2017)
    with pre-layer-norm blocks (Xiong et al., "On Layer Normalization in the Transformer
    Architecture", ICML 2020) and an optional [CLS] token (Devlin et al., BERT, NAACL 2019).

    Input: token ids ``[B, T]`` (give ``vocab_size``) or features ``[B, T, input_dim]``
    (give ``input_dim``: a linear projection to ``dim``). Positions are added (learned or
    sinusoidal, or none), then ``num_layers`` pre-LN blocks (``nn.MultiheadAttention``, a
    two-layer feed-forward network) and a final LayerNorm. Output: ``[B, T, dim]`` with
    ``pooling=None``, else ``[B, dim]``: the [CLS] token's state (``"cls"``) or the mean
    over the non-padded positions (``"mean"``).

    Args:
        dim: model width d.
        num_layers, num_heads: depth and attention heads (``dim % num_heads == 0``).
        vocab_size / input_dim: exactly one of them (see above).
        max_len: longest sequence (for learned positions; 512).
        positions: ``"learned"`` (default, as BERT), ``"sinusoidal"`` (Vaswani et al.) or
            ``None``.
        ffn_dim: hidden width of the feed-forward network (default 4d, as the paper).
        dropout: dropout on attention weights, residual branches and embeddings (0.1).
        activation: feed-forward activation (``"gelu"``, as BERT; the paper uses ReLU).
        pooling: ``"cls"``, ``"mean"`` or ``None`` (default ``"cls"``).
        padding_idx: token id of padding; with token input, positions holding it are masked
            from attention and from mean pooling unless ``padding_mask`` is given.

    ``forward(x, padding_mask=None)``: ``padding_mask [B, T]`` is True at padded positions.
    Embeddings (tokens, learned positions, [CLS]) are initialised N(0, 0.02²) as in BERT and
    not scaled by sqrt(d).
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_heads: int,
        *,
        vocab_size: int | None = None,
        input_dim: int | None = None,
        max_len: int = 512,
        positions: Literal["learned", "sinusoidal"] | None = "learned",
        ffn_dim: int | None = None,
        dropout: float = 0.1,
        activation: str = "gelu",
        pooling: Literal["cls", "mean"] | None = "cls",
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        if (vocab_size is None) == (input_dim is None):
            raise ValueError(
                f"give exactly one of vocab_size (token ids) and input_dim (feature vectors); "
                f"got vocab_size={vocab_size}, input_dim={input_dim}"
            )
        if dim < 1 or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if num_layers < 0:
            raise ValueError(f"num_layers={num_layers} must be >= 0")
        if positions not in ("learned", "sinusoidal", None):
            raise ValueError(f"positions={positions!r} must be 'learned', 'sinusoidal' or None")
        if pooling not in ("cls", "mean", None):
            raise ValueError(f"pooling={pooling!r} must be 'cls', 'mean' or None")
        if padding_idx is not None and vocab_size is None:
            raise ValueError("padding_idx only applies to token input (vocab_size)")
        self.dim, self.max_len, self.pooling = dim, max_len, pooling
        self.padding_idx = padding_idx
        self.positions = positions
        if vocab_size is not None:
            self.embed: nn.Module = nn.Embedding(vocab_size, dim, padding_idx=padding_idx)
        else:
            self.embed = nn.Linear(input_dim, dim)  # type: ignore[arg-type]
        # The [CLS] token takes position 0, so the table has one more row.
        length = max_len + (pooling == "cls")
        if positions == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(length, dim))
        elif positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(length, dim), persistent=False)
        if pooling == "cls":
            self.cls_token = nn.Parameter(torch.zeros(dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, ffn_dim or 4 * dim, dropout, activation)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim
        for name, p in self.named_parameters():
            if name in ("pos_embed", "cls_token") or (name == "embed.weight" and vocab_size):
                nn.init.normal_(p, std=0.02)
        if isinstance(self.embed, nn.Embedding) and padding_idx is not None:
            with torch.no_grad():
                self.embed.weight[padding_idx].zero_()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        tokens = isinstance(self.embed, nn.Embedding)
        if tokens and (x.dim() != 2 or x.is_floating_point()):
            raise ValueError(f"token input must be integer ids [B, T]; got {tuple(x.shape)}")
        if not tokens and x.dim() != 3:
            raise ValueError(f"feature input must be [B, T, input_dim]; got {tuple(x.shape)}")
        batch, length = x.shape[:2]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        if padding_mask is None and tokens and self.padding_idx is not None:
            padding_mask = x == self.padding_idx
        if padding_mask is not None:
            padding_mask = padding_mask.to(torch.bool)
            if padding_mask.shape != (batch, length):
                raise ValueError(
                    f"padding_mask has shape {tuple(padding_mask.shape)}, expected "
                    f"{(batch, length)}"
                )
            if self.pooling != "cls" and bool(padding_mask.all(dim=1).any()):
                raise ValueError("a sequence is entirely padding; it has nothing to encode")
        h = self.embed(x)
        if self.pooling == "cls":
            h = torch.cat([self.cls_token.expand(batch, 1, -1).to(h), h], dim=1)
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_zeros(batch, 1), padding_mask], 1)
        if self.positions == "learned":
            h = h + self.pos_embed[: h.shape[1]]
        elif self.positions == "sinusoidal":
            h = h + self.pos_table[: h.shape[1]].to(h)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, padding_mask)
        h = self.norm(h)
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "mean":
            if padding_mask is None:
                return h.mean(dim=1)
            keep = (~padding_mask).to(h.dtype)[..., None]
            return (h * keep).sum(dim=1) / keep.sum(dim=1)
        return h


@register_backbone("transformer_encoder")
def transformer_encoder(**kwargs: object) -> TransformerEncoder:
    """A pre-LN Transformer encoder (keyword arguments as :class:`TransformerEncoder`)."""
    return TransformerEncoder(**kwargs)  # type: ignore[arg-type]
