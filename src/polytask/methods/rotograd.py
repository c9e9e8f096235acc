"""RotoGrad: gradient homogenisation in magnitude and direction (Javaloy & Valera, ICLR 2022)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import AggregationResult, GradientMethod
from polytask.methods.registry import register

__all__ = ["RotoGrad", "RotoGradRotation"]

_TINY = 1e-15  # the official code's clamp of gradient norms


class RotoGradRotation(nn.Module):
    """K learnable rotations of a d-dimensional shared representation, one per task.

    R_k = matrix_exp(A_k - A_k^T) with A_k the strictly upper triangle of a free parameter
    (the exponential map onto SO(m), as the official code's ``geotorch.orthogonal(...,
    triv="expm")``), initialised at the identity. ``forward(z)`` returns the K rotated copies
    r_k = R_k z of ``z`` [..., d] (the rotation acts on the last dimension) computed with R_k
    *detached*: the task losses do not train the rotations; only RotoGrad's rotation objective
    does (see :class:`RotoGrad`). With ``rotation_size`` m < d, R_k rotates the first m
    coordinates and the others pass unchanged (the official code's rotation smaller than the
    representation): K m x m exponentials instead of K d x d.

    Args:
        num_tasks: K.
        size: d, the size of the representation's last dimension.
        rotation_size: m, how many leading coordinates rotate; default ``None`` (all d).
    """

    def __init__(self, num_tasks: int, size: int, rotation_size: int | None = None) -> None:
        super().__init__()
        rotation_size = size if rotation_size is None else rotation_size
        for name, value in (
            ("num_tasks", num_tasks),
            ("size", size),
            ("rotation_size", rotation_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidHyperparameterError(f"{name}={value!r} must be a positive integer")
        if rotation_size > size:
            raise InvalidHyperparameterError(
                f"rotation_size={rotation_size} must be at most the representation's size "
                f"{size} (it rotates that many leading coordinates)"
            )
        self.num_tasks = num_tasks
        self.size = size
        self.rotation_size = rotation_size
        self.generator_params = nn.Parameter(torch.zeros(num_tasks, rotation_size, rotation_size))

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, size={self.size}, rotation_size={self.rotation_size}"

    def matrices(self) -> Tensor:
        """The rotations R [K, m, m] (differentiable w.r.t. the parameters)."""
        a = torch.triu(self.generator_params, diagonal=1)
        return torch.linalg.matrix_exp(a - a.transpose(-1, -2))

    def forward(self, z: Tensor) -> list[Tensor]:
        if z.shape[-1] != self.size:
            raise ValueError(
                f"RotoGradRotation rotates a last dimension of size {self.size}, got features of "
                f"shape {tuple(z.shape)}"
            )
        r = self.matrices().detach().to(z.dtype)
        m = self.rotation_size
        if m == self.size:
            return [z @ r[k].T for k in range(self.num_tasks)]
        return [torch.cat([z[..., :m] @ r[k].T, z[..., m:]], dim=-1) for k in range(self.num_tasks)]


@register("rotograd")
class RotoGrad(GradientMethod):
    """RotoGrad: rotate each task's view of the representation and equalise gradient sizes.

    Works on the shared representation z [..., d] (``mode="features"`` only). Task k's head
    reads r_k = R_k z, with R_k a learnable rotation (:class:`RotoGradRotation`, held by the
    method as ``method.rotation``). Let g_k = R_k^T grad_{r_k} L_k be task k's gradient w.r.t.
    z (a row of the features-mode Jacobian). RotoGrad (Javaloy & Valera, "RotoGrad: Gradient
    Homogenization in Multitask Learning", ICLR 2022) does two things at every step:

    * magnitude: z receives sum_k C g_k / ||g_k|| with
      C = sum_k alpha_k ||g_k||,  alpha_k = (||g_k|| / ||g_k^0||) / sum_i (||g_i|| / ||g_i^0||),
      where g_k^0 is the gradient of the first step (re-taken at step ``burn_in_period``, as in
      the official code): every task pushes z with the same magnitude C, which leans towards
      the tasks that have converged least;
    * direction: each R_k gets the gradient of
      mean_n || R_k v_n - sg(grad_{r_k} L_k)_n ||^2, with v = (1/K) sum_k g_k ||gbar|| / ||g_k||
      (gbar the mean of the g_k; n runs over the rows of z), i.e. the rotations are learned so
      that the rotated task gradients R_k^T grad_{r_k} L_k align with a common direction.

    Norms are over the whole batch tensor, as in the official code (adrianjav/rotograd);
    the heads get their plain task gradients (``normalize_losses=False`` there).

    How to use it: build the method with the representation's size, give the heads the rotated
    features, and give ``method.parameters()`` (the rotations) to an optimizer; the paper
    advises a smaller learning rate for them than for the model::

        method = polytask.methods.create("rotograd", num_tasks=2, latent_size=d)
        opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=1e-3)
        opt_rot = torch.optim.Adam(method.parameters(), lr=1e-4)
        for x, ys in loader:
            opt.zero_grad()
            opt_rot.zero_grad()
            z = encoder(x)                         # [B, d]
            zs = method.rotate(z)                  # [R_1 z, ..., R_K z]
            losses = torch.stack([crit(h(zk), y) for h, zk, y in zip(heads, zs, ys)])
            method.backward(losses, shared_params=list(encoder.parameters()),
                            features=z, mode="features")
            opt.step()
            opt_rot.step()

    Without ``latent_size`` the rotations are created (with a warning) at the first
    ``backward`` from ``features.shape[-1]``, too late for an optimizer built before training:
    pass ``latent_size``. ``aggregate(J)`` applies the magnitude rule only.

    Args:
        num_tasks: K.
        latent_size: d, the size of the last dimension of ``features``; default ``None``
            (created lazily, see above).
        rotation_size: m <= d: only the first m coordinates of the representation rotate
            (as a rotation smaller than the representation in the official code); the cost of
            the rotations, K m x m matrix exponentials and their gradients a step, falls
            with m^3. Default ``None``: all d (the paper's setting). Needs ``latent_size``.
        burn_in_period: step at which the reference norms ||g_k^0|| are re-taken; default 20
            (official code). 0 keeps those of the first step.
    Needs: ``mode="features"`` with ``features`` = z, the unrotated representation.
    Returns weights: ``None`` (heads get their plain gradients); ``extras["scales"]`` holds
    C / ||g_k||, ``extras["rotation_loss"]`` the rotation objective.
    """

    paper: ClassVar[str] = (
        "Javaloy & Valera, RotoGrad: Gradient Homogenization in Multitask Learning, ICLR 2022"
    )
    modes: ClassVar[frozenset[str]] = frozenset({"features"})
    # With K copies of g every task gets the same unit vector: the update is K C g / ||g||.
    properties: ClassVar[frozenset[str]] = frozenset({"aligned_direction"})
    has_task_views: ClassVar[bool] = True  # the heads read R_k z (task_views)

    def __init__(
        self,
        num_tasks: int,
        *,
        latent_size: int | None = None,
        rotation_size: int | None = None,
        burn_in_period: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if latent_size is not None and (
            isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1
        ):
            raise InvalidHyperparameterError(
                f"latent_size={latent_size!r} must be None or a positive integer (the size of "
                "the last dimension of the shared representation)"
            )
        if (
            isinstance(burn_in_period, bool)
            or not isinstance(burn_in_period, int)
            or (burn_in_period < 0)
        ):
            raise InvalidHyperparameterError(
                f"burn_in_period={burn_in_period!r} must be an integer >= 0"
            )
        if rotation_size is not None and latent_size is None:
            raise InvalidHyperparameterError(
                f"rotation_size={rotation_size!r} needs latent_size (the size of the "
                "representation whose leading rotation_size coordinates rotate)"
            )
        self.latent_size = latent_size
        self.rotation_size = rotation_size
        self.burn_in_period = burn_in_period
        self.rotation: RotoGradRotation | None = (
            RotoGradRotation(num_tasks, latent_size, rotation_size)
            if latent_size is not None
            else None
        )
        self.register_buffer("initial_norms", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))

    # -- the rotations -------------------------------------------------------------------
    def rotate(self, z: Tensor) -> list[Tensor]:
        """The K rotated copies R_k z of the representation ``z`` [..., d], for the heads."""
        if self.rotation is None:
            self._create_rotation(z.shape[-1], z.device)
        assert self.rotation is not None
        return self.rotation(z)

    def task_views(self, features: Tensor) -> list[Tensor]:
        """The heads' inputs R_k z (the Trainer feeds them in features mode)."""
        return self.rotate(features)

    def _create_rotation(self, size: int, device: torch.device) -> None:
        warnings.warn(
            f"RotoGrad created its rotations now, for latent_size={size}; an optimizer built "
            "before this call does not hold them. Create the method with "
            f"latent_size={size} and give method.parameters() to an optimizer.",
            stacklevel=3,
        )
        self.rotation = RotoGradRotation(self.num_tasks, size).to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Rotations created lazily by the checkpointed instance: create them here too.
        key = prefix + "rotation.generator_params"
        if self.rotation is None and key in state_dict:
            k, d, _ = state_dict[key].shape
            self.rotation = RotoGradRotation(k, d)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _aggregate(
        self,
        jacobian: Tensor,
        losses: Tensor | None = None,
        *,
        features: Tensor | None = None,
        **ctx: Any,
    ) -> AggregationResult:
        norms = jacobian.norm(dim=1)
        extras: dict[str, Any] = {}
        if features is not None:
            extras["rotation_loss"] = self._rotation_step(jacobian, norms, features)
        norms = norms.clamp_min(_TINY)
        if self.counter == 0 or self.counter == self.burn_in_period:
            self.initial_norms.copy_(norms.detach())
        self.counter += 1
        ratios = norms / self.initial_norms.to(norms)
        alphas = ratios / ratios.sum().clamp_min(_TINY)
        magnitude = (alphas * norms).sum()
        scales = magnitude / norms
        direction = scales.to(jacobian.dtype) @ jacobian
        extras.update({"scales": scales.detach(), "alphas": alphas.detach()})
        return AggregationResult(direction=direction, weights=None, extras=extras)

    def _rotation_step(self, jacobian: Tensor, norms: Tensor, features: Tensor) -> float:
        """Accumulate the gradient of the rotation objective into the rotations' ``.grad``."""
        size = features.shape[-1]
        if self.rotation is None:
            self._create_rotation(size, features.device)
        assert self.rotation is not None
        if size != self.rotation.size:
            raise ValueError(
                f"RotoGrad was created with latent_size={self.rotation.size} but features have "
                f"shape {tuple(features.shape)}; the rotations act on the last dimension"
            )
        k, m = jacobian.shape[0], self.rotation.rotation_size
        g = jacobian.detach().reshape(k, -1, size)  # [K, N, d]: rows of z
        mean_norm = jacobian.mean(dim=0).norm()
        factors = torch.where(norms > 0, mean_norm / norms.clamp_min(_TINY), 0.0)
        target = (g * factors[:, None, None]).mean(dim=0)  # v [N, d]
        with torch.enable_grad():
            rot = self.rotation.matrices().to(jacobian.dtype)  # [K, m, m]
            # grad_{r_k} L_k on the rotated coordinates, and R_k v there
            rotated_grads = torch.einsum("kij,knj->kni", rot.detach(), g[..., :m])
            rotated_target = torch.einsum("kij,nj->kni", rot, target[:, :m])
            loss = (rotated_target - rotated_grads).pow(2).sum(-1).mean(-1).sum()
            params = [p for p in self.rotation.parameters() if p.requires_grad]
            if params:
                torch.autograd.backward(loss, inputs=params)
        if m < size:
            # The coordinates that do not rotate add a constant: the official objective's value.
            loss = loss.detach() + (target[:, m:] - g[..., m:]).pow(2).sum(-1).mean(-1).sum()
        return float(loss.detach())
