"""TaskPrompter: learnable task prompts attend jointly with the patch tokens of a ViT, and
their spatial and channel affinities to the patches are read out as task features."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.transformer_blocks import check_positive, per_task
from polytask.errors import InvalidHyperparameterError, PolytaskError

__all__ = ["PromptAttention", "TaskPrompter"]


class PromptAttention(nn.Module):
    """Joint spatial attention over [prompts; patches] plus the channel prompt affinity.

    Returns the updated patches and prompts and two affinity maps read out as task features:
    ``spatial`` [B, heads, T + N, T + N], the raw (unscaled, pre-softmax) scores ``q k^T`` of
    the joint attention, and ``channel`` [B, T, C, nh, nw], the raw scores between each
    prompt projected to N positions (``to_positions``) and each channel of the patches, within
    each of nh x nw spatial windows. The prompts also receive ``to_channels`` of their
    position projections, as in the official code.
    """

    def __init__(
        self, dim: int, num_heads: int, resolution: tuple[int, int], windows: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_heads, self.resolution = num_heads, resolution
        self.windows = math.isqrt(windows)
        positions = resolution[0] * resolution[1]
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.to_positions = nn.Linear(dim, positions)
        self.to_channels = nn.Linear(positions, dim)

    def forward(self, x: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, n, c = x.shape
        t = prompts.shape[1]
        seq = torch.cat([prompts, x], dim=1)
        q, k, v = self.qkv(seq).view(b, t + n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        spatial = q @ k.transpose(-2, -1)
        attn = self.dropout((spatial * q.shape[-1] ** -0.5).softmax(dim=-1))
        out = self.proj((attn @ v).transpose(1, 2).reshape(b, t + n, c))
        new_prompts, new_x = out[:, :t], out[:, t:]

        positions = self.to_positions(prompts)  # [B, T, N]
        w = self.windows
        hh, ww = self.resolution[0] // w, self.resolution[1] // w
        pq = positions.view(b, t, w, hh, w, ww).permute(0, 2, 4, 1, 3, 5).reshape(b, w * w, t, -1)
        xk = x.transpose(1, 2).reshape(b, c, w, hh, w, ww)
        xk = xk.permute(0, 2, 4, 1, 3, 5).reshape(b, w * w, c, -1)
        channel = (pq @ xk.transpose(-2, -1)).view(b, w, w, t, c).permute(0, 3, 4, 1, 2)
        new_prompts = new_prompts + self.to_channels(positions)
        return new_x, new_prompts, spatial, channel


class _Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        windows: int,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PromptAttention(dim, num_heads, resolution, windows, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, prompts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dx, dp, spatial, channel = self.attn(self.norm1(x), self.norm1(prompts))
        x = x + dx
        x = x + self.mlp(self.norm2(x))
        prompts = prompts + dp
        prompts = prompts + self.mlp(self.norm2(prompts))
        return x, prompts, spatial, channel


class _Readout(nn.Module):
    """One task's features at one layer from its prompts' spatial and channel affinities."""

    def __init__(self, dim: int, feature_dim: int, out_dim: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(dim, feature_dim, kernel_size=1)
        self.channel = nn.Conv2d(dim, feature_dim, kernel_size=1)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * feature_dim, out_dim, kernel_size=1),
            nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_dim),
            nn.GELU(),
            nn.Conv2d(out_dim, out_dim, kernel_size=1),
        )

    def forward(self, x: Tensor, spatial: Tensor, channel: Tensor) -> Tensor:
        # spatial: [B, M, H, W], one map per (head, prompt) scaling its group of C / M channels
        b, c, h, w = x.shape
        m = spatial.shape[1]
        groups = x.view(b, m, c // m, h, w) * spatial.unsqueeze(2)
        fs = self.spatial(groups.reshape(b, c, h, w) + x)
        # channel: [B, C, nh, nw], one channel scale per window
        nh, nw = channel.shape[-2:]
        scale = channel.repeat_interleave(h // nh, dim=2).repeat_interleave(w // nw, dim=3)
        fc = self.channel(scale * x + x)
        return self.fuse(torch.cat([fs, fc], dim=1))


@register("task_prompter")
class TaskPrompter(MultiTaskModel):
    """TaskPrompter: task prompt tokens learned jointly with the patch tokens of a ViT.

    Ye & Xu, "TaskPrompter: Spatial-Channel Multi-Task Prompting for Dense Scene
    Understanding", ICLR 2023 (official code: prismformore/Multi-Task-Transformer). Each task
    has ``prompt_len`` learnable prompt tokens prepended to the patch tokens; every block
    attends over prompts and patches jointly (:class:`PromptAttention`). At the blocks
    ``select_layers`` and after the last one, each task's features are read out from its
    prompts: the spatial affinity of its prompt to the patches (one map per head) scales the
    head's channel group, its channel affinity (per spatial window) scales the channels, and
    both are fused by a small conv block (:class:`_Readout`); the readouts are summed over
    layers. With ``cross_task=True`` (the paper's cross-task reasoning) task t's feature is
    then ``sum_s a_ts F_s`` with weights a_ts from the prompt-to-prompt attention of t.
    Each task's head maps its feature to its output at the input resolution.

    Parameters: the prompts attend jointly with the patches, so every prompt changes every
    task's output: they are shared parameters, as are the backbone blocks. Each task owns
    its head, and its readouts unless ``cross_task`` mixes them into every task (then each
    task owns only its cross-task weighting convs).

    Args:
        tasks: task names or K.
        image_size: (H, W) of the inputs (fixed: learned positions, window layout).
        patch_size: 16 in the paper (ViT-B/16, ViT-L/16); default 2 here.
        in_channels: 3.
        embed_dim, depth, num_heads, mlp_ratio: ViT size (paper ViT-B: 768, 12, 12, 4);
            default 32, 4, 4, 4.
        prompt_len: prompt tokens per task (paper: 1; cross-task reasoning needs 1).
        windows: nh x nw spatial windows of the channel affinity, a square number whose root
            divides the patch grid (official ``chan_nheads``, 16 on PASCAL; default 1).
        select_layers: 1-based blocks read out before the last one (official ViT-B: 3 of
            them); default evenly spaced, ``depth * i // 4`` for i = 1, 2, 3.
        feature_dim, out_dim: readout widths (official 780 and 1024); default embed_dim.
        cross_task: the paper's cross-task reasoning (on, as in the official configs).
        heads: per task (list or dict) a module mapping [B, out_dim, H/p, W/p] to an output
            (upsampled to the input size); default a 1x1 convolution to ``out_channels``.
        out_channels: outputs of each default head (default 1).
        dropout: attention dropout (0 in the official configs).
    Needs: nothing beyond the task losses.

    Departures: no ImageNet weights are loaded (initialise ``patch_embed`` and ``blocks``
    yourself); the official 4x upsampling of the task features before the heads is folded
    into the heads' final resize to the input size.
    """

    paper: ClassVar[str] = (
        "Ye & Xu, TaskPrompter: Spatial-Channel Multi-Task Prompting for Dense Scene "
        "Understanding, ICLR 2023"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        *,
        image_size: tuple[int, int] = (32, 32),
        patch_size: int = 2,
        in_channels: int = 3,
        embed_dim: int = 32,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        prompt_len: int = 1,
        windows: int = 1,
        select_layers: Sequence[int] | None = None,
        feature_dim: int | None = None,
        out_dim: int | None = None,
        cross_task: bool = True,
        heads: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
        out_channels: int | Sequence[int] | Mapping[str, int] = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        check_positive(
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            prompt_len=prompt_len,
            windows=windows,
        )
        grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        if grid[0] * patch_size != image_size[0] or grid[1] * patch_size != image_size[1]:
            raise InvalidHyperparameterError(
                f"patch_size={patch_size} must divide image_size={tuple(image_size)}"
            )
        root = math.isqrt(windows)
        if root * root != windows or grid[0] % root or grid[1] % root:
            raise InvalidHyperparameterError(
                f"windows={windows} must be a square number whose root divides the patch grid "
                f"{grid}"
            )
        if embed_dim % (num_heads * prompt_len):
            raise InvalidHyperparameterError(
                f"embed_dim={embed_dim} must be divisible by num_heads * prompt_len = "
                f"{num_heads * prompt_len} (one spatial map per head and prompt)"
            )
        if cross_task and prompt_len != 1:
            raise InvalidHyperparameterError(
                f"cross_task=True needs prompt_len=1 (got {prompt_len}), as in the official code"
            )
        if select_layers is None:
            select_layers = sorted({depth * i // 4 for i in (1, 2, 3)} - {0, depth})
        select_layers = sorted(select_layers)
        if len(set(select_layers)) != len(select_layers) or any(
            not 1 <= s < depth for s in select_layers
        ):
            raise InvalidHyperparameterError(
                f"select_layers={select_layers} must be distinct blocks in 1..{depth - 1}"
            )
        feature_dim = feature_dim or embed_dim
        out_dim = out_dim or embed_dim
        self.image_size, self.grid = tuple(image_size), grid
        self.prompt_len, self.cross_task = prompt_len, cross_task
        self.select_layers = tuple(select_layers)
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, grid[0] * grid[1], embed_dim) * 0.02)
        # The official code draws the prompts from a normal with mean 1 and std 1.
        self.prompts = nn.Parameter(torch.randn(self.num_tasks * prompt_len, embed_dim) + 1.0)
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, grid, windows, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        readouts = len(self.select_layers) + 1
        self.readouts = nn.ModuleList(
            nn.ModuleDict({t: _Readout(embed_dim, feature_dim, out_dim) for t in self.tasks})
            for _ in range(readouts)
        )
        self.cross = None
        if cross_task:
            self.cross = nn.ModuleList(
                nn.ModuleDict({t: self._cross_conv(num_heads) for t in self.tasks})
                for _ in range(readouts)
            )
        if heads is None:
            outs = per_task(out_channels, self.tasks, "out_channels")
            heads = [nn.Conv2d(out_dim, c, kernel_size=1) for c in outs]
        self.heads = nn.ModuleDict(dict(zip(self.tasks, per_task(heads, self.tasks, "heads"))))

    @staticmethod
    def _cross_conv(num_heads: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(num_heads, num_heads, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(num_heads, 1, kernel_size=1),
        )

    def _read(self, i: int, x: Tensor, spatial: Tensor, channel: Tensor) -> dict[str, Tensor]:
        b, _, c = x.shape
        fmap = x.transpose(1, 2).reshape(b, c, *self.grid)
        p, t_all = self.prompt_len, self.num_tasks * self.prompt_len
        feats = {}
        for k, t in enumerate(self.tasks):
            sp = spatial[:, :, k * p : (k + 1) * p, t_all:].reshape(b, -1, *self.grid)
            feats[t] = self.readouts[i][t](fmap, sp, channel[:, k * p])
        if self.cross is None:
            return feats
        mixed = {}
        for k, t in enumerate(self.tasks):
            weights = self.cross[i][t](spatial[:, :, k : k + 1, :t_all])  # [B, 1, 1, K]
            mixed[t] = sum(weights[..., s : s + 1] * feats[u] for s, u in enumerate(self.tasks))
        return mixed

    def task_features(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's summed readout [B, out_dim, H/p, W/p]."""
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[-2:]) != self.image_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise PolytaskError(
                f"TaskPrompter was built for images [B, C, {self.image_size[0]}, "
                f"{self.image_size[1]}], got {shape}"
            )
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        prompts = self.prompts.expand(h.shape[0], -1, -1)
        total: dict[str, Tensor] = {}
        readout = 0
        for depth, block in enumerate(self.blocks, start=1):
            h, prompts, spatial, channel = block(h, prompts)
            is_last = depth == len(self.blocks)
            if depth in self.select_layers or is_last:
                feats = self._read(readout, self.norm(h) if is_last else h, spatial, channel)
                readout += 1
                for t, f in feats.items():
                    total[t] = total[t] + f if t in total else f
        return total

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        feats = self.task_features(x)
        names = self.tasks if task is None else (task,)
        size = self.image_size
        out = {
            t: F.interpolate(
                self.heads[t](feats[t]), size=size, mode="bilinear", align_corners=False
            )
            for t in names
        }
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        self.check_task(task)
        if self.cross is None:
            for readout in self.readouts:
                yield from readout[task].parameters()
        else:
            for cross in self.cross:
                yield from cross[task].parameters()
        yield from self.heads[task].parameters()
