"""STCH: smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError, InvalidLossesError, MethodStateError
from polytask.methods._preference import preference_vector
from polytask.methods.base import LossMethod
from polytask.methods.registry import register

#: The official code's offset inside the logs: log(L_k + 1e-20), log(L_k / n_k + 1e-20).
_EPS = 1e-20


@register("stch")
class STCH(LossMethod):
    """STCH: minimise a smooth maximum of the normalised log losses (after a warm-up).

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024: the smooth Tchebycheff scalarisation

        g_mu(f | lambda) = mu log sum_k exp(lambda_k (f_k - z_k) / mu)

    of objectives f with preference lambda and ideal point z, a smooth upper bound of the
    Tchebycheff max_k lambda_k (f_k - z_k) that it approaches as mu -> 0. For multi-task
    learning we follow the official code (github.com/Xi-L/STCH, ``STCH_MTL``, also LibMTL's
    ``STCH``), which works with the epoch (0-based) ``e`` and the warm-up length ``E``:

    * ``e < E``: minimise sum_k log(L_k + 1e-20), the log losses with equal weight.
    * ``e == E``: the same, while averaging the training losses of every step of the epoch
      into the nadir point n [K].
    * ``e > E``: f_k = log(L_k / n_k + 1e-20) (the losses normalised by the nadir point, in
      log scale, with ideal point z = 0) and minimise K g_mu(f | lambda); the factor K (the
      official code's) keeps the objective on the scale of a sum of K losses.

    The nadir sums are buffers, so a checkpoint taken during the warm-up resumes it.

    Args:
        num_tasks: K.
        mu: smoothing parameter, > 0; default 1.0 (the official MTL code and LibMTL).
        warmup_epochs: E, >= 0; default 4 (the official MTL code and LibMTL).
        pref_vector: lambda [K], non-negative with a positive entry; default all ones (the
            official MTL code has no preference, i.e. lambda = 1).
    Needs: ``epoch`` (0-based) in every ``backward`` call; losses > 0 (logs are taken).
    Returns weights: the gradient of the objective w.r.t. each loss: 1 / (L_k + 1e-20)
    during the warm-up, then K s_k lambda_k / (L_k + 1e-20 n_k) with
    s = softmax(lambda f / mu).
    """

    paper: ClassVar[str] = (
        "Lin, Zhang, Yang, Liu, Wang & Zhang, Smooth Tchebycheff Scalarization for "
        "Multi-Objective Optimization, ICML 2024"
    )
    needs: ClassVar[frozenset[str]] = frozenset({"epoch"})

    def __init__(
        self,
        num_tasks: int,
        *,
        mu: float = 1.0,
        warmup_epochs: int = 4,
        pref_vector: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_tasks, **kwargs)
        if (
            isinstance(mu, bool)
            or not isinstance(mu, (int, float))
            or not (math.isfinite(mu) and mu > 0)
        ):
            raise InvalidHyperparameterError(f"mu={mu!r} must be a finite number > 0")
        if (
            isinstance(warmup_epochs, bool)
            or not isinstance(warmup_epochs, int)
            or warmup_epochs < 0
        ):
            raise InvalidHyperparameterError(
                f"warmup_epochs={warmup_epochs!r} must be an integer >= 0"
            )
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.pref_vector = None if pref_vector is None else tuple(pref_vector)
        pref = preference_vector(pref_vector, num_tasks, default=1.0, nonnegative=True)
        self.register_buffer("preference", pref)
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("nadir", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("has_nadir", torch.zeros((), dtype=torch.bool))

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        epoch = ctx["epoch"]
        bad = [i for i, ok in enumerate((losses.detach() > 0).tolist()) if not ok]
        if bad:
            raise InvalidLossesError(
                "STCH takes the log of every loss and needs them positive; task(s) "
                + ", ".join(f"{i} (L={float(losses.detach()[i]):.6g})" for i in bad)
                + " are not"
            )
        if epoch <= self.warmup_epochs:
            if epoch == self.warmup_epochs:
                self.loss_sum += losses.detach().to(self.loss_sum)
                self.loss_count += 1
            shifted = losses + _EPS
            return shifted.log().sum(), 1.0 / shifted.detach()
        nadir = self._nadir().to(losses)
        k = self.num_tasks
        pref = self.preference.to(losses)
        f = (losses / nadir + _EPS).log()
        scaled = pref * f / self.mu
        total = k * self.mu * torch.logsumexp(scaled, dim=0)
        soft = torch.softmax(scaled.detach(), dim=0)
        weights = k * soft * pref / (losses.detach() + _EPS * nadir)
        return total, weights

    def _nadir(self) -> Tensor:
        """The nadir point: the mean training loss of the warm-up's last epoch."""
        if not bool(self.has_nadir):
            if int(self.loss_count) == 0:
                raise MethodStateError(
                    f"STCH estimates its nadir point from the losses of epoch "
                    f"{self.warmup_epochs} (warmup_epochs={self.warmup_epochs}) and saw no step "
                    "of that epoch; pass epoch= the current 0-based epoch in every backward "
                    "call, from 0"
                )
            self.nadir.copy_(self.loss_sum / self.loss_count)
            self.has_nadir.fill_(True)
        return self.nadir
