"""RGW: random gradient weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import GramianMethod
from polytask.methods.registry import register

_DISTRIBUTIONS = ("normal", "uniform", "dirichlet", "bernoulli", "constrained_bernoulli")


def sample_random_weights(distribution: str, k: int, generator: torch.Generator) -> Tensor:
    """One draw of random task weights [K] (float64), as in the random-weighting paper.

    ``normal``/``uniform``/``dirichlet``: softmax of a N(0, I), U(0, 1)^K or Dir(1) draw;
    ``bernoulli``: independent Bernoulli(1/2) weights, redrawn while all are 0, not
    normalised; ``constrained_bernoulli``: one task, chosen uniformly, gets weight 1.
    """
    if distribution == "normal":
        return torch.softmax(torch.randn(k, generator=generator, dtype=torch.float64), 0)
    if distribution == "uniform":
        return torch.softmax(torch.rand(k, generator=generator, dtype=torch.float64), 0)
    if distribution == "dirichlet":
        # Dir(1, ..., 1) = normalised Exp(1) draws; -log(1 - U) with U in [0, 1) is finite.
        expo = -torch.log1p(-torch.rand(k, generator=generator, dtype=torch.float64))
        return torch.softmax(expo / expo.sum(), 0)
    if distribution == "bernoulli":
        while True:
            w = (torch.rand(k, generator=generator, dtype=torch.float64) < 0.5).to(torch.float64)
            if bool(w.any()):
                return w
    if distribution == "constrained_bernoulli":
        w = torch.zeros(k, dtype=torch.float64)
        w[int(torch.randint(k, (1,), generator=generator))] = 1.0
        return w
    raise InvalidHyperparameterError(
        f"distribution={distribution!r} must be one of {', '.join(_DISTRIBUTIONS)}"
    )


@register("rgw")
class RGW(GramianMethod):
    """RGW: combine the task gradients with fresh random weights at every step.

    d = sum_k w_k g_k with w = softmax(z), z ~ N(0, I_K) drawn from ``self.generator`` at
    each step (the paper's default distribution). Lin, Ye, Zhang & Tsang, "Reasonable
    Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022
    (Random Gradient Weighting; its loss-level twin is RLW). The weights do not depend on the
    gradients; RGW is a Gramian method only so that d = weights @ J.

    Other distributions of the paper (as implemented by its authors in LibMTL's RLW):
    ``"uniform"`` (softmax of U(0, 1) draws), ``"dirichlet"`` (softmax of a Dir(1) draw, as in
    LibMTL), ``"bernoulli"`` (0/1 weights with probability 1/2, redrawn if all are 0, not
    normalised), ``"constrained_bernoulli"`` (one uniformly chosen task per step). The
    paper's "random normal" variant (normal with random mean and variance) is not offered.

    Args:
        num_tasks: K.
        distribution: ``"normal"`` (default) or one of the above.
    Needs: the Jacobian.
    Returns weights: the random draw w, so d = weights @ J.
    """

    partial_tasks: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Lin, Ye, Zhang & Tsang, Reasonable Effectiveness of Random Weighting: A Litmus Test "
        "for Multi-Task Learning, TMLR 2022"
    )
    properties: ClassVar[frozenset[str]] = frozenset({"positively_homogeneous", "aligned_identity"})
    stochastic: ClassVar[bool] = True

    def __init__(self, num_tasks: int, *, distribution: str = "normal", **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if distribution not in _DISTRIBUTIONS:
            raise InvalidHyperparameterError(
                f"distribution={distribution!r} must be one of {', '.join(_DISTRIBUTIONS)}"
            )
        if distribution == "bernoulli":
            # Weights do not sum to 1: aligned gradients give a positive multiple of g.
            self.properties = frozenset({"positively_homogeneous", "aligned_direction"})
        self.distribution = distribution

    def _weights(self, gramian: Tensor, losses: Tensor | None = None, **ctx: Any) -> Tensor:
        w = sample_random_weights(self.distribution, gramian.shape[0], self.generator)
        return w.to(dtype=gramian.dtype, device=gramian.device)
