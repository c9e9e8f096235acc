"""Task Switching Networks (TSN): one encoder-decoder, every parameter shared, switched
between tasks by a task embedding that modulates the decoder (AdaIN)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import infer_out_channels
from polytask.errors import PolytaskError

__all__ = ["AdaIN", "TaskSwitching"]

_PAPER = (
    "Sun, Probst, Paudel, Popovic, Kanakis, Patel, Dai & Van Gool, Task Switching Network for "
    "Multi-task Learning, ICCV 2021"
)


class _EqualLinear(nn.Module):
    """Linear layer with StyleGAN's equalised learning rate: weights drawn from N(0, 1) and
    scaled by ``sqrt(2 / fan_in)`` at run time (the official ``SLinear``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = math.sqrt(2.0 / in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class _PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class AdaIN(nn.Module):
    """Adaptive instance normalisation conditioned on the running task (Huang & Belongie,
    ICCV 2017; StyleGAN's form): ``gamma_t * instance_norm(x) + beta_t`` on ``[B, C, ...]``.

    A placeholder without parameters: :class:`TaskSwitching` finds every ``AdaIN`` of its
    decoder, owns one affine map per layer from the task embedding to ``(gamma, beta)``, and
    sets the layer's style around each task's forward. Place ``AdaIN(channels)`` layers in a
    decoder of your own (a U-Net with skips, say) to condition it where you want.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"AdaIN channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.style: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.style is None:
            raise PolytaskError(
                "an AdaIN layer ran without a task style; run it inside a TaskSwitching model "
                "(forward(x, task=...))"
            )
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"AdaIN({self.channels}) needs [B, {self.channels}, ...] feature maps with at "
                f"least one spatial dimension, got shape {tuple(x.shape)}"
            )
        gamma, beta = self.style.reshape(self.style.shape[0], 2, self.channels).unbind(1)
        shape = gamma.shape + (1,) * (x.dim() - 2)
        return F.instance_norm(x) * gamma.reshape(shape) + beta.reshape(shape)

    def extra_repr(self) -> str:
        return str(self.channels)


def _style_map(latent: int, channels: int) -> _EqualLinear:
    # The official FC_A: biases start at gamma = 1, beta = 0.
    a = _EqualLinear(latent, 2 * channels)
    with torch.no_grad():
        a.bias[:channels] = 1.0
    return a


@register("task_switching")
class TaskSwitching(MultiTaskModel):
    """Task Switching Network: a single encoder-decoder, every weight shared, task-conditioned.

    Sun, Probst, Paudel, Popovic, Kanakis, Patel, Dai & Van Gool, "Task Switching Network for
    Multi-task Learning", ICCV 2021 (official code: github.com/GuoleiSun/TSNs). The network
    performs one task at a time: a task-agnostic encoder, then a decoder whose layers are
    modulated by the task. Task t's code ``z_t`` goes through the task embedding network
    (pixel norm, then ``mapping_layers`` equalised-lr linear layers with LeakyReLU(0.2)) to
    ``w_t``; each :class:`AdaIN` layer of the decoder maps ``w_t`` by its own affine map
    ``A_i`` to ``(gamma, beta)`` and computes ``gamma * instance_norm(h) + beta``. The head is
    shared too, so the parameter count does not grow with the number of tasks.

    Hyper-parameters (official defaults):
        code: ``"onehot"`` (fixed binary codes: task k's code has ``code_width`` ones in block
            k of a ``K * code_width`` vector, as in the official code) or ``"learned"`` (one
            trainable code per task, started at the same vectors).
        code_width: ones per task (20); the embedding width is ``K * code_width``.
        mapping_layers: depth of the task embedding network (8).
        out_channels: ``{task: channels}`` for tasks whose output is narrower than the shared
            head's; as in the official code, the head's channels are average-pooled down to
            that number (adaptive pooling along the channel axis).

    Decoder: a list of stages, each then followed by ``AdaIN`` and ``LeakyReLU()`` (the
    official ``convrelu`` block: conv -> AdaIN -> LeakyReLU; give stages that end with their
    convolution), or a module containing :class:`AdaIN` layers, used as it is (e.g. a U-Net
    whose encoder returns its skips).

    Partition: every parameter is shared (encoder, embedding network, style maps, decoder,
    head). With ``code="learned"`` a task's parameters are its code only; with ``"onehot"``
    (the paper) no parameter belongs to a task. :meth:`encode` is the task-agnostic encoder.

    Departures: the official network is a ResNet-18 U-Net whose 1x1 skip convolutions are
    conditioned too; here the conditioned layers are the AdaIN layers you place (or the ones
    added after each decoder stage), and the encoder stays task-agnostic as in the paper.

    Args:
        tasks: task names or their number K.
        encoder: the task-agnostic encoder (no AdaIN inside).
        decoder: a list of stages, or a module with AdaIN layers (see above).
        head: the shared prediction layer.
        channels: output channels of the decoder stages (inferred when omitted).
    """

    paper = _PAPER
    has_shared_representation = True

    def __init__(
        self,
        tasks: Sequence[str] | int,
        encoder: nn.Module,
        decoder: nn.Module | Sequence[nn.Module],
        head: nn.Module,
        *,
        channels: Sequence[int] | None = None,
        out_channels: Mapping[str, int] | None = None,
        code: str = "onehot",
        code_width: int = 20,
        mapping_layers: int = 8,
    ) -> None:
        super().__init__(tasks)
        for what, m in (("encoder", encoder), ("head", head)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{what} must be an nn.Module, got {type(m).__name__}")
        if any(isinstance(m, AdaIN) for m in encoder.modules()):
            raise ValueError(
                "the encoder contains AdaIN layers; TSN's encoder is task-agnostic, put the "
                "conditioned layers in the decoder"
            )
        self.encoder = encoder
        self.decoder = self._build_decoder(decoder, channels)
        self.head = head
        self.out_channels = self._check_out_channels(out_channels)
        for name, value in (("code_width", code_width), ("mapping_layers", mapping_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int")
        if code_width < 1:
            raise ValueError(f"code_width={code_width} must be at least 1")
        latent = self.num_tasks * code_width
        codes = torch.zeros(self.num_tasks, latent)
        for k in range(self.num_tasks):
            codes[k, k * code_width : (k + 1) * code_width] = 1.0
        self.code = code
        if code == "onehot":
            self.register_buffer("codes", codes, persistent=False)
            self.task_codes = None
        elif code == "learned":
            self.task_codes = nn.ParameterDict(
                {t: nn.Parameter(codes[k].clone()) for k, t in enumerate(self.tasks)}
            )
        else:
            raise ValueError(f"code={code!r} must be 'onehot' or 'learned'")
        layers: list[nn.Module] = [_PixelNorm()]
        for _ in range(mapping_layers):
            layers += [_EqualLinear(latent, latent), nn.LeakyReLU(0.2)]
        self.embedding = nn.Sequential(*layers)
        self.styles = nn.ModuleList([_style_map(latent, a.channels) for a in self._adains()])

    def _build_decoder(
        self, decoder: nn.Module | Sequence[nn.Module], channels: Sequence[int] | None
    ) -> nn.Module:
        if isinstance(decoder, nn.Module) and any(isinstance(m, AdaIN) for m in decoder.modules()):
            if channels is not None:
                raise ValueError("channels= is for a list of decoder stages, not an AdaIN decoder")
            return decoder
        if isinstance(decoder, nn.Module) and not isinstance(
            decoder, (nn.Sequential, nn.ModuleList)
        ):
            raise ValueError(
                f"the decoder {type(decoder).__name__} has no AdaIN layer; give a list of "
                "stages (each is then followed by AdaIN) or place AdaIN layers in it"
            )
        stages = list(decoder)
        if not stages:
            raise ValueError("decoder is empty; give at least one stage")
        if channels is not None and len(channels) != len(stages):
            raise ValueError(
                f"channels has {len(channels)} entries for {len(stages)} decoder stages"
            )
        blocks = []
        for i, stage in enumerate(stages):
            if not isinstance(stage, nn.Module):
                raise TypeError(f"decoder stage {i} must be an nn.Module, got {type(stage)}")
            c = channels[i] if channels is not None else infer_out_channels(stage)
            if c is None:
                raise ValueError(
                    f"cannot infer the output channels of decoder stage {i}; pass channels="
                )
            blocks.append(nn.Sequential(stage, AdaIN(int(c)), nn.LeakyReLU()))
        return nn.Sequential(*blocks)

    def _check_out_channels(self, out_channels: Mapping[str, int] | None) -> dict[str, int]:
        if out_channels is None:
            return {}
        if not isinstance(out_channels, Mapping):
            raise TypeError(f"out_channels must be a dict {{task: channels}}, got {out_channels!r}")
        for t, c in out_channels.items():
            self.check_task(t)
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"out_channels[{t!r}]={c!r} must be a positive int")
        return dict(out_channels)

    def _adains(self) -> list[AdaIN]:
        return [m for m in self.decoder.modules() if isinstance(m, AdaIN)]

    # -- forward -------------------------------------------------------------------------
    def task_code(self, task: str) -> Tensor:
        """Task ``task``'s code ``z_t`` (the input of the task embedding network)."""
        t = self.check_task(task)
        if self.task_codes is not None:
            return self.task_codes[t]
        return self.codes[self.tasks.index(t)]

    def task_embedding(self, task: str) -> Tensor:
        """``w_t``, the task embedding network's output for task ``task``."""
        return self.embedding(self.task_code(task)[None])[0]

    def encode(self, x: Any) -> Tensor:
        return self.encoder(x)

    def _decode_one(self, features: Any, task: str) -> Tensor:
        w = self.task_embedding(task)[None]
        layers = self._adains()
        try:
            for layer, style in zip(layers, self.styles):
                layer.style = style(w)
            y = self.head(self.decoder(features))
        finally:
            for layer in layers:
                layer.style = None
        c = self.out_channels.get(task)
        return y if c is None else _pool_channels(y, c, task)

    def decode(self, features: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            return self._decode_one(features, self.check_task(task))
        return {t: self._decode_one(features, t) for t in self.tasks}

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            self.check_task(task)
        # The encoder is task-agnostic: one pass serves every task.
        return self.decode(self.encode(x), task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        t = self.check_task(task)
        if self.task_codes is not None:
            yield self.task_codes[t]


def _pool_channels(y: Tensor, c: int, task: str) -> Tensor:
    width = y.shape[1]
    if c > width:
        raise ValueError(
            f"out_channels[{task!r}]={c} is more than the head's {width} output channels"
        )
    if c == width:
        return y
    moved = y.movedim(1, -1)
    pooled = F.adaptive_avg_pool1d(moved.reshape(-1, 1, width), c)
    return pooled.reshape(*moved.shape[:-1], c).movedim(-1, 1)
