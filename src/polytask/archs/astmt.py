"""Attentive single-tasking of multiple tasks (ASTMT): per-task attention on one shared
network, and an adversarial discriminator on the task gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polytask.archs._conditioning import TaskSwitch, replace_modules
from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import (
    ModuleSpec,
    check_positions,
    infer_out_channels,
    per_task_modules,
    stage_channels,
)
from polytask.errors import PolytaskError

__all__ = ["ASTMT", "AdaptedConv2d", "SqueezeExcitation", "reverse_gradient"]

_PAPER = "Maninis, Radosavovic & Kokkinos, Attentive Single-Tasking of Multiple Tasks, CVPR 2019"


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.alpha, None


def reverse_gradient(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Identity forward; the backward multiplies the gradient by ``-alpha`` (Ganin & Lempitsky,
    "Unsupervised Domain Adaptation by Backpropagation", ICML 2015)."""
    return _GradientReversal.apply(x, alpha)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu, Shen & Sun, CVPR 2018): ``x * sigmoid(W2 relu(W1 mean(x)))``,
    the mean over every dimension after the channels; hidden width ``channels // reduction``."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(
                f"squeeze-and-excitation on {channels} channels with reduction={reduction} has "
                "no hidden unit; lower reduction"
            )
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        squeezed = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        gate = self.fc(squeezed)
        return x * gate.reshape(gate.shape + (1,) * (x.dim() - 2))


class AdaptedConv2d(nn.Module):
    """A convolution with a parallel residual adapter per task: ``conv(x) + A_t(x)``.

    ``A_t`` is a 1x1 convolution (no bias) with the conv's stride, started at zero (so the
    layer starts as the given conv), and aligned with the conv's receptive-field centres: it
    pads (or crops) the input by ``p - d(k-1)/2`` (zero padding, whatever the conv's padding
    mode). Parallel adapters: Rebuffi, Bilen & Vedaldi,
    "Efficient parametrization of multi-domain deep neural networks", CVPR 2018.
    """

    def __init__(self, conv: nn.Conv2d, tasks: Sequence[str], switch: TaskSwitch) -> None:
        super().__init__()
        self.conv = conv
        self.switch = switch
        shift = []
        for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
            if d * (k - 1) % 2:
                raise ValueError(
                    f"cannot align a parallel 1x1 adapter with a conv of kernel {conv.kernel_size}"
                    f" and dilation {conv.dilation} (no centre pixel); exclude it from adapters"
                )
            p = (
                conv.padding[i]
                if not isinstance(conv.padding, str)
                else (d * (k - 1) // 2 if conv.padding == "same" else 0)
            )
            shift.append(p - d * (k - 1) // 2)
        self._crop = tuple(max(-s, 0) for s in shift)
        pad = tuple(max(s, 0) for s in shift)
        self.adapters = nn.ModuleDict(
            {
                t: nn.Conv2d(
                    conv.in_channels,
                    conv.out_channels,
                    1,
                    stride=conv.stride,
                    padding=pad,
                    bias=False,
                    device=conv.weight.device,
                    dtype=conv.weight.dtype,
                )
                for t in tasks
            }
        )
        for a in self.adapters.values():
            nn.init.zeros_(a.weight)

    def forward(self, x: Tensor) -> Tensor:
        task = self.switch.current("a residual adapter")
        ch, cw = self._crop
        aligned = x[..., ch : x.shape[-2] - ch, cw : x.shape[-1] - cw] if ch or cw else x
        return self.conv(x) + self.adapters[task](aligned)


def _default_adapted(_: str, conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and any(k > 1 for k in conv.kernel_size)


class _FullyConvDiscriminator(nn.Module):
    """Per-position task classifier on ``[B, C, ...]``: ``depth`` 1x1 layers (ReLU between),
    the official code's ``FullyConvDiscriminator`` (kernel 1)."""

    def __init__(self, channels: int, num_tasks: int, depth: int) -> None:
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"discriminator_depth={depth} must be 1 or 2 (the official choices)")
        layers: list[nn.Module] = []
        if depth == 2:
            layers += [nn.Linear(channels, channels, bias=False), nn.ReLU()]
        layers.append(nn.Linear(channels, num_tasks))
        self.model = nn.Sequential(*layers)

    def forward(self, g: Tensor) -> Tensor:
        return self.model(g.movedim(1, -1)).movedim(-1, 1)


class _FeatureStore(dict):
    """Each task's features from the last forward, for :meth:`ASTMT.discriminator_loss`.

    They are part of a graph, so a copy of the model (``deepcopy``, pickling) starts empty
    rather than failing on them.
    """

    def __deepcopy__(self, memo: dict) -> _FeatureStore:
        return _FeatureStore()

    def __reduce__(self) -> tuple:
        return (_FeatureStore, ())


@register("astmt")
class ASTMT(MultiTaskModel):
    """Attentive single-tasking of multiple tasks: per-task SE and adapters on a shared network.

    Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019
    (official code: github.com/facebookresearch/astmt). The network performs one task at a
    time: the shared stages run once per task, modulated by that task's

    * squeeze-and-excitation blocks after the chosen stages (task-specific channel attention),
    * residual adapters: a 1x1 convolution per task in parallel with each chosen convolution
      of the stages (zero-initialised, so training starts from the given network),

    and the task's head reads the modulated features. To keep any task from dominating the
    shared weights, a discriminator is trained to recognise the task from the (per-position,
    L2-normalised) gradient of the task loss w.r.t. those features, through a gradient
    reversal layer, so that the network learns to make the task gradients indistinguishable:
    :meth:`discriminator_loss`.

    Hyper-parameters (paper / official defaults):
        se_after: stages followed by per-task SE (default every stage; ``[]`` for none).
        reduction: SE reduction ratio (16, SE-ResNet's; the official decoder uses 4).
        adapters: ``True`` adapts every ``groups=1`` conv with a kernel larger than 1x1 (the
            adapters run in parallel with the 3x3 convolutions), ``False`` none, or a predicate
            ``(name, conv) -> bool``.
        discriminator: ``True`` (a fully convolutional discriminator of ``discriminator_depth``
            1x1 layers, default 2), ``False``, or your module ``[B, C, ...] -> [B, K, ...]``.
        The training loop's constants: adversarial weight ``w = 0.01`` in
        ``(1 - w) * task losses + w * discriminator loss``, discriminator learning rate x10
        (:meth:`discriminator_parameters`), reversal strength :meth:`reversal_alpha`.

    Training with the adversarial term (it needs the task losses' graph, so it comes before the
    balancing method's backward, which frees it)::

        out = model(x)                                       # records each task's features
        losses = torch.stack([crit[t](out[t], y[t]) for t in model.tasks])
        adv = model.discriminator_loss(losses, alpha=ASTMT.reversal_alpha(epoch / epochs))
        (0.01 * adv).backward(retain_graph=True)             # trains D; reversed for the net
        method.backward(0.99 * losses, shared_params=list(model.shared_parameters()))
        optimizer.step()

    ``aux_loss()`` is ``None``: the adversarial term cannot be formed from the forward alone.
    :meth:`loss_terms` returns ``w * discriminator_loss`` with the reversal schedule, which
    :class:`polytask.train.Trainer` backpropagates before the method's backward (the trainer
    leaves the task losses unscaled: the paper's (1 - w) = 0.99 factor is a common scale).

    Single-tasking: the stages run once per task, so their batch norms (shared) see each
    task's modulated features in turn.

    Partition: shared are the stages (with their convs) and the discriminator (no task owns it;
    it gets gradients only from :meth:`discriminator_loss`); a task's parameters are its SE
    blocks, its adapters and its head.

    Departures: the official network is an SE-ResNet DeepLab-v3+ whose per-task SE blocks sit
    inside each residual block (before the addition) and start from the pretrained SE weights;
    here SE blocks follow the given stages and start from PyTorch's default initialisation.
    The official discriminator reads the decoder features at a fixed 128x128 label map and
    ignores unlabelled pixels; here it reads the stages' output (what the heads read) at its
    own resolution, and ``valid`` masks play the role of the unlabelled pixels. The official
    code runs one optimiser step per task; :meth:`discriminator_loss` sums the per-task terms
    so that one step covers all tasks.

    Args:
        tasks: task names or their number K.
        stages: the shared network as a list of stage modules (converted in place where
            adapted).
        heads: each task's head (module copied per task, ``factory(task)``, or a dict).
        channels: output channels of the ``se_after`` stages (inferred when omitted).
        feature_channels: channels of the last stage's output, for the default discriminator
            (inferred when omitted).
    """

    paper = _PAPER

    def __init__(
        self,
        tasks: Sequence[str] | int,
        stages: Sequence[nn.Module],
        heads: ModuleSpec,
        *,
        se_after: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        reduction: int = 16,
        adapters: bool | Callable[[str, nn.Conv2d], bool] = True,
        discriminator: bool | nn.Module = True,
        discriminator_depth: int = 2,
        feature_channels: int | None = None,
    ) -> None:
        super().__init__(tasks)
        if isinstance(stages, nn.Module) and not isinstance(stages, (nn.Sequential, nn.ModuleList)):
            raise TypeError(f"stages must be a list of stages, got one {type(stages).__name__}")
        stage_list = list(stages)
        if not stage_list:
            raise ValueError("stages is empty; give at least one stage")
        self._switch = TaskSwitch("ASTMT")
        if adapters is not False:
            wanted = _default_adapted if adapters is True else adapters
            if not callable(wanted):
                raise TypeError(f"adapters must be a bool or a predicate, got {adapters!r}")
            converted = 0
            for i, stage in enumerate(stage_list):
                stage_list[i], names = replace_modules(
                    stage,
                    lambda n, m: isinstance(m, nn.Conv2d) and bool(wanted(n, m)),
                    lambda _, m: AdaptedConv2d(m, self.tasks, self._switch),
                )
                converted += len(names)
            if not converted:
                raise ValueError(
                    "adapters found no convolution to adapt in stages (by default: groups=1 "
                    "convs with a kernel larger than 1x1); pass adapters=False or a predicate"
                )
        self.stages = nn.ModuleList(stage_list)
        if se_after is not None and len(se_after) == 0:
            positions: list[int] = []  # adapters only (the paper's "RA" ablation)
        else:
            positions = check_positions(se_after, len(self.stages), "se_after")
        widths = stage_channels(self.stages, positions, channels, "se_after")
        self.se = nn.ModuleDict(
            {
                t: nn.ModuleDict(
                    {str(j): SqueezeExcitation(widths[j], reduction) for j in positions}
                )
                for t in self.tasks
            }
        )
        self.heads = per_task_modules(self.tasks, heads, "heads")
        self.discriminator = self._build_discriminator(
            discriminator, discriminator_depth, feature_channels
        )
        self._features = _FeatureStore()

    def _build_discriminator(
        self, spec: bool | nn.Module, depth: int, channels: int | None
    ) -> nn.Module | None:
        if isinstance(spec, nn.Module):
            return spec
        if spec is False:
            return None
        if spec is not True:
            raise TypeError(f"discriminator must be a bool or an nn.Module, got {spec!r}")
        if channels is None:
            channels = infer_out_channels(self.stages[-1])
            if channels is None:
                raise ValueError(
                    "cannot infer the channels of the last stage's output for the "
                    "discriminator; pass feature_channels="
                )
        return _FullyConvDiscriminator(channels, self.num_tasks, depth)

    # -- forward -------------------------------------------------------------------------
    def _run(self, x: Any, task: str) -> Tensor:
        se = self.se[task]
        with self._switch.use(task):
            h = x
            for j, stage in enumerate(self.stages):
                h = stage(h)
                if str(j) in se:
                    h = se[str(j)](h)
        if self.discriminator is not None and torch.is_grad_enabled():
            self._features[task] = h
        return self.heads[task](h)

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        wanted = list(self.tasks) if task is None else [self.check_task(task)]
        self._features.clear()
        out = {t: self._run(x, t) for t in wanted}
        return self._select(out, task)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        t = self.check_task(task)
        yield from self.se[t].parameters()
        for m in self.stages.modules():
            if isinstance(m, AdaptedConv2d):
                yield from m.adapters[t].parameters()
        yield from self.heads[t].parameters()

    # -- adversarial training ------------------------------------------------------------
    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """The discriminator's parameters (the paper trains them with a 10x learning rate)."""
        if self.discriminator is not None:
            yield from self.discriminator.parameters()

    #: The paper's weight w of the discriminator loss.
    adversarial_weight = 0.01

    def loss_terms(self, losses: Tensor, *, progress: float) -> Tensor | None:
        """``w * discriminator_loss(losses, alpha=reversal_alpha(progress))`` (see the class
        docstring), or ``None`` without a discriminator."""
        if self.discriminator is None:
            return None
        alpha = self.reversal_alpha(progress)
        return self.adversarial_weight * self.discriminator_loss(losses, alpha=alpha)

    @staticmethod
    def reversal_alpha(progress: float) -> float:
        """Gradient-reversal strength ``2 / (1 + exp(-10 p)) - 1`` at training progress ``p``
        in [0, 1] (Ganin & Lempitsky's schedule; the official code uses p = (epoch+1)/epochs)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress={progress} must be in [0, 1] (the fraction of training)")
        return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0

    def discriminator_loss(
        self,
        losses: Tensor | Mapping[str, Tensor],
        *,
        alpha: float = 1.0,
        valid: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The discriminator's cross-entropy at recognising each task from its gradient.

        For each task t of ``losses`` (a ``[K]`` tensor in task order, or ``{task: loss}``
        for the tasks run), ``g_t = d loss_t / d f_t`` with ``f_t`` the features the heads
        read in the last forward, kept in the graph (``create_graph``); each position's
        gradient is L2-normalised over channels, passed through :func:`reverse_gradient`
        with ``alpha``, classified by the discriminator, and scored by cross-entropy against
        label t at every position (``valid[t]``, a bool ``[B, ...]`` mask of the output's
        positions, leaves some out). Returns the sum over tasks of the mean cross-entropies.

        Its backward trains the discriminator to tell the tasks apart and, reversed, the
        network (every parameter the gradients depend on) to make them indistinguishable.
        Call it after the forward and before anything frees the losses' graph.
        """
        if self.discriminator is None:
            raise PolytaskError("this ASTMT has no discriminator (discriminator=False)")
        if isinstance(losses, Tensor):
            if losses.shape != (self.num_tasks,):
                raise ValueError(
                    f"losses has shape {tuple(losses.shape)}; give the {self.num_tasks} task "
                    f"losses in task order {list(self.tasks)}, or a dict {{task: loss}}"
                )
            named = dict(zip(self.tasks, losses.unbind()))
        elif isinstance(losses, Mapping):
            named = {self.check_task(t): v for t, v in losses.items()}
        else:
            raise TypeError(f"losses must be a tensor or a dict, got {type(losses).__name__}")
        if not named:
            raise ValueError("losses is empty; give at least one task's loss")
        total = None
        for t, loss in named.items():
            if t not in self._features:
                raise PolytaskError(
                    f"no features of task {t!r} from the last forward; run model(x) (or "
                    f"model(x, task={t!r})) with gradients enabled before discriminator_loss"
                )
            f = self._features[t]
            (g,) = torch.autograd.grad(loss, f, create_graph=True)
            g = g / (g.norm(p=2, dim=1, keepdim=True) + 1e-10)
            logits = self.discriminator(reverse_gradient(g, alpha))
            target = torch.full(
                (logits.shape[0], *logits.shape[2:]),
                self.tasks.index(t),
                dtype=torch.long,
                device=logits.device,
            )
            if valid is not None and t in valid:
                mask = valid[t].to(device=logits.device, dtype=torch.bool)
                if mask.shape != target.shape:
                    raise ValueError(
                        f"valid[{t!r}] has shape {tuple(mask.shape)}, the discriminator's output "
                        f"positions are {tuple(target.shape)}"
                    )
                target = target.masked_fill(~mask, -100)
            term = F.cross_entropy(logits, target, ignore_index=-100)
            total = term if total is None else total + term
        assert total is not None
        return total
