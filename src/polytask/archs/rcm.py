"""Reparameterized convolutions (RCM): a frozen shared filter bank, per-task 1x1 modulators."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.archs._conditioning import TaskSwitch, replace_modules
from polytask.archs.base import MultiTaskModel
from polytask.archs.registry import register
from polytask.archs.soft_sharing._build import ModuleSpec, per_task_modules
from polytask.errors import PolytaskError

__all__ = ["RCM", "RCMConv2d", "TaskBatchNorm", "convert_to_rcm"]

_PAPER = (
    "Kanakis, Bruggemann, Saha, Georgoulis, Obukhov & Van Gool, Reparameterizing Convolutions "
    "for Incremental Multi-Task Learning without Task Interference, ECCV 2020"
)


class _Modulator(nn.Module):
    """One task's 1x1 modulator W_t of a conv with ``out`` channels in ``groups`` groups.

    Plain: a free matrix per group. With NFF (normalized feature fusion) each row (output
    filter) is weight-normalised, ``W_t[o] = g_o v_o / ||v_o||``, as the official code does with
    ``torch.nn.utils.weight_norm`` on the modulator.
    """

    def __init__(self, out: int, groups: int, nff: bool, bias: bool) -> None:
        super().__init__()
        per = out // groups
        # Identity per group, so W_t W_s = W_s: the converted network starts as the given one.
        eye = torch.eye(per).repeat(groups, 1)
        self.nff = nff
        if nff:
            self.direction = nn.Parameter(eye)
            self.gain = nn.Parameter(torch.ones(out))
        else:
            self.weight = nn.Parameter(eye)
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def matrix(self) -> Tensor:
        """The modulator as a ``[out, out / groups]`` matrix (row o mixes o's group)."""
        if self.nff:
            return self.gain[:, None] * self.direction / self.direction.norm(dim=1, keepdim=True)
        return self.weight

    @torch.no_grad()
    def set_matrix(self, m: Tensor) -> None:
        if self.nff:
            self.direction.copy_(m)
            self.gain.copy_(m.norm(dim=1))
        else:
            self.weight.copy_(m)


class RCMConv2d(nn.Module):
    """A convolution reparameterised per task as ``W_t · W_s`` (RCM, Kanakis et al., ECCV 2020).

    ``W_s`` is the given conv (kept as :attr:`bank`, frozen by default: the shared filter bank)
    and ``W_t`` the running task's 1x1 modulator (grouped like the conv), applied to the bank's
    responses: ``y = W_t (W_s * x + b_s) + b_t``. The forward composes the two into one conv of
    the bank's shape (``W = W_t W_s``, ``b = W_t b_s + b_t``), which is what the modulated conv is.
    The modulators start at the identity (``b_t = 0``), so the layer starts as the given conv.

    Args:
        conv: the convolution to reparameterise (an ``nn.Conv2d``).
        tasks: the task names (one modulator each).
        switch: the :class:`~polytask.archs._conditioning.TaskSwitch` naming the running task.
        nff: weight-normalise the modulators' filters (normalized feature fusion).
        freeze: freeze the filter bank (the paper's setting).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        tasks: Sequence[str],
        switch: TaskSwitch,
        *,
        nff: bool = True,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"RCMConv2d reparameterises an nn.Conv2d, got {type(conv).__name__}")
        self.bank = conv
        self.switch = switch
        has_bias = conv.bias is not None
        self.modulators = nn.ModuleDict(
            {t: _Modulator(conv.out_channels, conv.groups, nff, has_bias) for t in tasks}
        )
        if freeze:
            conv.requires_grad_(False)
        self._record: _Moments | None = None

    def weight_and_bias(self, task: str) -> tuple[Tensor, Tensor | None]:
        """Task ``task``'s composed filters ``W_t W_s`` and bias ``W_t b_s + b_t``."""
        bank, mod = self.bank, self.modulators[task]
        g = bank.groups
        m = mod.matrix().reshape(g, -1, bank.out_channels // g)
        w = torch.bmm(m, bank.weight.reshape(g, bank.out_channels // g, -1))
        w = w.reshape(bank.weight.shape)
        b = None
        if bank.bias is not None:
            b = torch.bmm(m, bank.bias.reshape(g, -1, 1)).reshape(-1)
            b = b + mod.bias
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        task = self.switch.current("an RCM convolution")
        if self._record is not None:
            self._record.add(self.bank(x), self.bank.groups)
        w, b = self.weight_and_bias(task)
        return self.bank._conv_forward(x, w, b)

    def extra_repr(self) -> str:
        nff = next(iter(self.modulators.values())).nff
        return f"tasks={list(self.modulators)}, nff={nff}"


class TaskBatchNorm(nn.Module):
    """One copy of a batch-norm layer per task (statistics and affine parameters), chosen by the
    running task: RCM's task-specific normalisation, so no trainable part of the backbone is
    shared. Each copy starts from the given layer (e.g. its pretrained statistics)."""

    def __init__(self, norm: nn.Module, tasks: Sequence[str], switch: TaskSwitch) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({t: copy.deepcopy(norm) for t in tasks})
        self.switch = switch

    def forward(self, x: Tensor) -> Tensor:
        return self.norms[self.switch.current("a task-specific batch norm")](x)


def convert_to_rcm(
    module: nn.Module,
    tasks: Sequence[str],
    switch: TaskSwitch,
    *,
    nff: bool = True,
    norm_per_task: bool = True,
    freeze: bool = True,
) -> nn.Module:
    """Convert a conv network to RCM form, in place; returns it (or the replacement when
    ``module`` is itself a conv).

    Every ``nn.Conv2d`` becomes an :class:`RCMConv2d` (frozen filter bank + per-task
    modulators), every batch norm a :class:`TaskBatchNorm` when ``norm_per_task``; with
    ``freeze`` every other parameter left shared is frozen too, so that no trainable parameter
    is shared between tasks (the paper's guarantee of no task interference). The converted
    layers read the running task from ``switch``, so the network must run inside
    ``switch.use(task)`` (which :class:`RCM` does).
    """
    if any(isinstance(m, (RCMConv2d, TaskBatchNorm)) for m in module.modules()):
        raise PolytaskError(
            f"{type(module).__name__} is already in RCM form; give the plain conv network"
        )
    task_names = tuple(tasks)

    def convert(_: str, m: nn.Module) -> nn.Module:
        if isinstance(m, nn.Conv2d):
            return RCMConv2d(m, task_names, switch, nff=nff, freeze=freeze)
        return TaskBatchNorm(m, task_names, switch)

    def match(_: str, m: nn.Module) -> bool:
        if isinstance(m, nn.Conv2d):
            return True
        return norm_per_task and isinstance(m, nn.modules.batchnorm._BatchNorm)

    module, _ = replace_modules(module, match, convert)
    if not any(isinstance(m, RCMConv2d) for m in module.modules()):
        raise ValueError(
            f"the backbone {type(module).__name__} has no nn.Conv2d to reparameterise; RCM "
            "needs a convolutional backbone"
        )
    if freeze:
        owned = set()
        for m in module.modules():
            if isinstance(m, RCMConv2d):
                owned |= {id(p) for p in m.modulators.parameters()}
            elif isinstance(m, TaskBatchNorm):
                owned |= {id(p) for p in m.parameters()}
        for p in module.parameters():
            if id(p) not in owned:
                p.requires_grad_(False)
    return module


@register("rcm")
class RCM(MultiTaskModel):
    """Reparameterized convolutions: a frozen shared filter bank, modulated per task.

    Kanakis, Bruggemann, Saha, Georgoulis, Obukhov & Van Gool, "Reparameterizing Convolutions
    for Incremental Multi-Task Learning without Task Interference", ECCV 2020 (official code:
    github.com/menelaoskanakis/RCM). Every convolution of the user's backbone is rewritten as
    ``W_t · W_s`` (:func:`convert_to_rcm`): ``W_s``, the pre-trained filters, is a shared
    filter bank and stays frozen; ``W_t`` is a task-specific 1x1 "modulator" (RCM) that starts
    at the identity, so training starts from the given pre-trained network. Batch norms are
    task-specific, and each task has its own head (the paper's decoder). No trainable parameter
    is shared, so training one task leaves the others' outputs untouched: no task interference,
    and tasks can be added incrementally. The network runs once per task.

    Hyper-parameters (the paper's full model, "RC + RI + NFF"):
        nff: normalized feature fusion, i.e. weight-normalised modulator filters (default True).
        norm_per_task: task-specific batch norms (default True, as in the official configs).
            With ``False`` the batch norms are shared: frozen with ``freeze_shared``, but their
            running statistics still follow every task's batches.
        freeze_shared: freeze the filter bank and any other parameter left shared (default
            True). ``False`` trains the bank jointly, which brings task interference back.
        Response initialisation (RI) needs data: call :meth:`response_initialization` with
        a few batches before training.

    Partition: :meth:`shared_parameters` are the filter banks (and any other shared layer of
    the backbone); with ``freeze_shared`` none of them requires grad, so a balancing method has
    nothing shared to balance (``backward`` raises :class:`~polytask.errors.EmptyParametersError`):
    train RCM with the summed losses, each task's own parameters getting its own gradient.
    A task's parameters: its modulators, its batch norms and its head.

    Departures: the official code reparameterises the ResNet encoder of a DeepLab network and
    takes ``W_s`` from an RC ImageNet checkpoint; here any ``nn.Conv2d`` of the given backbone
    is converted and the identity modulator keeps the given weights as the bank. Response
    initialisation computes the PCA of each bank's responses on the batches it is given
    (the official code used ImageNet mini-val).

    Args:
        tasks: task names or their number K.
        backbone: the user's conv network (converted in place).
        heads: each task's head (module copied per task, ``factory(task)``, or a dict).
    """

    paper = _PAPER

    def __init__(
        self,
        tasks: Sequence[str] | int,
        backbone: nn.Module,
        heads: ModuleSpec,
        *,
        nff: bool = True,
        norm_per_task: bool = True,
        freeze_shared: bool = True,
    ) -> None:
        super().__init__(tasks)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        self._switch = TaskSwitch("RCM")
        self.backbone = convert_to_rcm(
            backbone,
            self.tasks,
            self._switch,
            nff=nff,
            norm_per_task=norm_per_task,
            freeze=freeze_shared,
        )
        self.heads = per_task_modules(self.tasks, heads, "heads")

    def rcm_convs(self) -> list[RCMConv2d]:
        return [m for m in self.backbone.modules() if isinstance(m, RCMConv2d)]

    def _run(self, x: Any, task: str) -> Tensor:
        with self._switch.use(task):
            return self.heads[task](self.backbone(x))

    def forward(self, x: Any, task: str | None = None) -> dict[str, Tensor] | Tensor:
        if task is not None:
            return self._run(x, self.check_task(task))
        return {t: self._run(x, t) for t in self.tasks}

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        t = self.check_task(task)
        for m in self.backbone.modules():
            if isinstance(m, RCMConv2d):
                yield from m.modulators[t].parameters()
            elif isinstance(m, TaskBatchNorm):
                yield from m.norms[t].parameters()
        yield from self.heads[t].parameters()

    @torch.no_grad()
    def response_initialization(self, batches: Iterable[Any], task: str | None = None) -> None:
        """Response initialisation (RI): rotate each filter bank into the principal directions
        of its responses.

        Runs the network (in eval mode, through ``task``'s path; the first task by default)
        on ``batches`` (inputs only), takes for each RCM conv the covariance of its bank's
        responses over all pixels and, per group, its eigenvectors ``U`` (by decreasing
        variance); then ``W_s <- U^T W_s``, ``b_s <- U^T b_s`` and every task's modulator
        ``W_t <- W_t U``. Every task's composed filters ``W_t W_s`` are unchanged, so the
        network computes the same function; what changes is the basis the modulators act in.
        Call it before training (the paper initialises from ImageNet responses).
        """
        t = self.tasks[0] if task is None else self.check_task(task)
        convs = self.rcm_convs()
        for conv in convs:
            conv._record = _Moments()
        was_training = self.training
        self.eval()
        try:
            seen = 0
            for x in batches:
                self._run(x, t)
                seen += 1
        finally:
            self.train(was_training)
            moments = [conv._record for conv in convs]
            for conv in convs:
                conv._record = None
        if seen == 0:
            raise ValueError("response_initialization got no batches; give at least one input")
        for conv, mom in zip(convs, moments):
            assert mom is not None
            _rotate(conv, mom.bases())


class _Moments:
    """Running sums of a bank's responses per group (float64), for their covariance."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def add(self, y: Tensor, groups: int) -> None:
        c = y.shape[1]
        flat = y.detach().transpose(0, 1).reshape(groups, c // groups, -1).double()
        s = flat.sum(dim=2)
        o = torch.bmm(flat, flat.transpose(1, 2))
        self.sum = s if self.sum is None else self.sum + s
        self.outer = o if self.outer is None else self.outer + o
        self.count += flat.shape[2]

    def bases(self) -> Tensor:
        """Per group, the eigenvectors of the response covariance as columns, by decreasing
        eigenvalue: ``[groups, c, c]``."""
        assert self.sum is not None and self.outer is not None
        mean = self.sum / self.count
        cov = self.outer / self.count - mean[:, :, None] * mean[:, None, :]
        _, vectors = torch.linalg.eigh(cov)
        return vectors.flip(-1)


def _rotate(conv: RCMConv2d, bases: Tensor) -> None:
    bank = conv.bank
    g, per = bank.groups, bank.out_channels // bank.groups
    u = bases.to(bank.weight)
    w = torch.bmm(u.transpose(1, 2), bank.weight.reshape(g, per, -1))
    bank.weight.copy_(w.reshape(bank.weight.shape))
    if bank.bias is not None:
        bank.bias.copy_(torch.bmm(u.transpose(1, 2), bank.bias.reshape(g, per, 1)).reshape(-1))
    for mod in conv.modulators.values():
        m = mod.matrix().detach().reshape(g, per, per)
        mod.set_matrix(torch.bmm(m, u).reshape(-1, per))
