"""RLW: random loss weighting (Lin, Ye, Zhang & Tsang, TMLR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.errors import InvalidHyperparameterError
from polytask.methods.base import LossMethod
from polytask.methods.registry import register
from polytask.methods.rgw import sample_random_weights

_DISTRIBUTIONS = (
    "normal",
    "uniform",
    "dirichlet",
    "bernoulli",
    "constrained_bernoulli",
    "random_normal",
)


@register("rlw")
class RLW(LossMethod):
    """RLW: minimise sum_k w_k L_k with fresh random weights w at every step.

    w = f(z), z ~ p(z), drawn from ``self.generator`` at each ``backward``; by default
    w = softmax(z), z ~ N(0, I_K), the default of the paper's experiments and the only
    distribution the current LibMTL keeps. Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of
    Random Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022 (Random Loss
    Weighting; its gradient-level twin is ``rgw``). One backward pass, as cheap as EW.

    The paper's other distributions (``distribution=``), drawn as in the authors' code
    (LibMTL 1.1.5's RLW and the code of the ICLR 2022 submission):

    * ``"uniform"``: softmax of U(0, 1)^K.
    * ``"dirichlet"``: softmax of a Dir(1, ..., 1) draw (as LibMTL; the draw is already on
      the simplex, the softmax flattens it towards 1/K).
    * ``"bernoulli"``: independent Bernoulli(1/2) weights in {0, 1}, redrawn while all are 0,
      not normalised (their sum is random).
    * ``"constrained_bernoulli"``: one task, chosen uniformly, gets weight 1 (LibMTL 1.1.5
      lists it but fails on it: its ``random`` module is not imported).
    * ``"random_normal"``: softmax of N(mu, diag(sigma^2)) with mu_k, sigma_k ~ U(0, 1) drawn
      once, when the method is built (buffers ``normal_mean``, ``normal_std``).

    Args:
        num_tasks: K.
        distribution: ``"normal"`` (default) or one of the above.
        seed: seeds ``self.generator`` (unseeded: a random seed).
    Needs: the losses only.
    Returns weights: the draw w (sums to 1 except for ``"bernoulli"``).
    """

    paper: ClassVar[str] = (
        "Lin, Ye, Zhang & Tsang, Reasonable Effectiveness of Random Weighting: A Litmus Test "
        "for Multi-Task Learning, TMLR 2022"
    )
    stochastic: ClassVar[bool] = True

    def __init__(self, num_tasks: int, *, distribution: str = "normal", **kwargs: Any) -> None:
        super().__init__(num_tasks, **kwargs)
        if distribution not in _DISTRIBUTIONS:
            raise InvalidHyperparameterError(
                f"distribution={distribution!r} must be one of {', '.join(_DISTRIBUTIONS)}"
            )
        self.distribution = distribution
        if distribution == "random_normal":
            gen = self.generator
            self.register_buffer("normal_mean", torch.rand(num_tasks, generator=gen).double())
            self.register_buffer("normal_std", torch.rand(num_tasks, generator=gen).double())

    def sample(self) -> Tensor:
        """One draw of the weights [K] (float64, CPU), advancing ``self.generator``."""
        if self.distribution == "random_normal":
            z = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
            return torch.softmax(self.normal_mean.cpu() + self.normal_std.cpu() * z, dim=0)
        return sample_random_weights(self.distribution, self.num_tasks, self.generator)

    def objective(self, losses: Tensor, **ctx: Any) -> tuple[Tensor, Tensor]:
        # K numbers from the CPU generator, one small copy to the losses' device.
        w = self.sample().to(device=losses.device, dtype=losses.dtype)
        return (w * losses).sum(), w
