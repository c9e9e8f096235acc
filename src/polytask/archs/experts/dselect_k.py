"""DSelect-k: a differentiable gate that selects at most k of n experts."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from polytask.archs.experts._blocks import ModuleSpec, TowerSpec, check_positive
from polytask.archs.experts.moe import _GatedPerTask
from polytask.archs.registry import register
from polytask.errors import InvalidHyperparameterError

__all__ = ["DSelectK", "DSelectKGate", "smooth_step"]

#: Added inside the entropy's log, as the official code does.
_EPSILON = 1e-6


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step of DSelect-k (from Hazimeh et al., 2020): exactly 0 for
    t <= -gamma/2, exactly 1 for t >= gamma/2, ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2``
    in between (continuously differentiable)."""
    cubic = -2.0 / gamma**3 * t**3 + 3.0 / (2.0 * gamma) * t + 0.5
    return torch.where(
        t <= -gamma / 2,
        torch.zeros_like(t),
        torch.where(t >= gamma / 2, torch.ones_like(t), cubic),
    )


class DSelectKGate(nn.Module):
    """One task's DSelect-k gate over ``num_experts`` experts.

    k single-expert selectors, each a binary code of m = ceil(log2 n) smooth-step bits:
    selector i puts weight ``r(z_i)_e = prod_b S(z_ib) if bit b of e is 1 else
    1 - S(z_ib)`` on expert e (a point of the simplex when n is a power of 2, at most 1
    in total otherwise; exactly one-hot once every bit saturates); the gate is
    ``sum_i softmax(w)_i r(z_i)``, so at most k experts get weight.
    With ``conditioning="example"`` z and w are linear functions of the input
    (per-example gating), with ``"task"`` they are free parameters (task-only gating).

    Initialisation as the official code: z ~ U(-gamma/100, gamma/100), w ~ U(-0.05, 0.05)
    (Keras' RandomUniform default), weights and biases alike.
    """

    def __init__(
        self,
        num_experts: int,
        k: int,
        gamma: float,
        conditioning: str,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
            raise InvalidHyperparameterError(
                f"num_experts={num_experts!r}: DSelect-k selects among at least 2 experts"
            )
        self.num_experts = num_experts
        self.k = check_positive("k", k)
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
            raise InvalidHyperparameterError(f"gamma={gamma!r} must be a positive number")
        if conditioning not in ("example", "task"):
            raise InvalidHyperparameterError(
                f"conditioning={conditioning!r} must be 'example' or 'task'"
            )
        self.gamma = float(gamma)
        self.conditioning = conditioning
        self.num_bits = math.ceil(math.log2(num_experts))
        codes = [
            [(e >> (self.num_bits - 1 - b)) & 1 for b in range(self.num_bits)]
            for e in range(num_experts)
        ]
        # codes[e, b]: bit b (most significant first) of expert e's index. The official code
        # (and LibMTL) build them as np.array([list(np.binary_repr(e, m))]).astype(bool),
        # which gives these codes under NumPy 1.x but all-True codes under NumPy >= 2 (a
        # non-empty string such as "0" casts to True), so integer bit operations it is.
        self.register_buffer(
            "codes", torch.tensor(codes, dtype=torch.bool).reshape(num_experts, self.num_bits)
        )
        bound = self.gamma / 100
        if conditioning == "example":
            if in_features is None:
                raise InvalidHyperparameterError(
                    "conditioning='example' gates read the input: give in_features"
                )
            self.z_logits = nn.Linear(in_features, k * self.num_bits)
            self.w_logits = nn.Linear(in_features, k)
            for p in self.z_logits.parameters():
                nn.init.uniform_(p, -bound, bound)
            for p in self.w_logits.parameters():
                nn.init.uniform_(p, -0.05, 0.05)
        else:
            self.z = nn.Parameter(torch.empty(k, self.num_bits).uniform_(-bound, bound))
            self.w = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))

    @property
    def power_of_2(self) -> bool:
        return self.num_experts == 2**self.num_bits

    def logits(self, routing_input: Tensor | None) -> tuple[Tensor, Tensor]:
        """(z [..., k, m], w [..., k]); ``...`` is [B] for per-example gating, empty else."""
        if self.conditioning == "example":
            if routing_input is None:
                raise ValueError("a per-example DSelect-k gate needs its routing input")
            z = self.z_logits(routing_input).reshape(-1, self.k, self.num_bits)
            return z, self.w_logits(routing_input)
        return self.z, self.w

    def selectors(self, z: Tensor) -> Tensor:
        """Single-expert selector outputs r(z_i) [..., k, n] from z [..., k, m]."""
        s = smooth_step(z, self.gamma).unsqueeze(-2)  # [..., k, 1, m]
        return torch.where(self.codes, s, 1 - s).prod(dim=-1)

    def forward(self, routing_input: Tensor | None) -> tuple[Tensor, Tensor]:
        """(expert weights [..., n], selector outputs [..., k, n])."""
        z, w = self.logits(routing_input)
        selectors = self.selectors(z)
        weights = (torch.softmax(w, dim=-1).unsqueeze(-1) * selectors).sum(dim=-2)
        return weights, selectors

    def regularizer(self, selectors: Tensor, entropy_reg: float) -> Tensor | None:
        """The official ``_add_regularization_loss``: ``entropy_reg * H`` with
        ``H = -sum r log(r + 1e-6)`` over every selector (and example), plus, when n is not
        a power of 2, ``sum 1 / sum_e r_e`` over selectors (and examples), which keeps each
        selector's weight on reachable experts."""
        terms = []
        if entropy_reg:
            terms.append(-entropy_reg * (selectors * torch.log(selectors + _EPSILON)).sum())
        if not self.power_of_2:
            terms.append((1.0 / selectors.sum(dim=-1)).sum())
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]


@register("dselect_k")
class DSelectK(_GatedPerTask):
    """Mixture of experts with one DSelect-k gate per task (at most k experts each).

    Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k:
    Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
    Learning", NeurIPS 2021 (official code: google-research/dselect_k_moe). Like MMoE, n
    experts are shared and task k reads ``h_k(sum_e a_k(x)_e f_e(x))``, but a_k comes from a
    :class:`DSelectKGate`: k binary-encoded selectors built from the smooth-step function
    with width gamma, mixed by softmax weights, so a_k has at most k non-zeros and becomes
    exactly sparse once the selectors' bits saturate.

    Args:
        tasks, in_features, num_experts, expert, tower, out_features, expert_features:
            as :class:`~polytask.archs.experts.moe.MMoE`.
        k: the number of selectors, an upper bound on the experts each task uses.
        gamma: the smooth-step width (official default 1.0).
        entropy_reg: lambda of the paper's entropy regulariser on the selectors (the
            official ``EntropyRegularizer``), which speeds their convergence; returned by
            :meth:`aux_loss` after a training forward; default 1e-6, the official
            ``EntropyRegularizer``'s default schedule (a constant). 0 turns it off.
        conditioning: ``"example"`` (gates read x, official "example-conditioned" routing;
            default, the drop-in replacement for MMoE's softmax gates) or ``"task"``
            (static per-task gates, the official "task-only" routing).

    :meth:`aux_loss` also holds the official term ``sum 1 / sum_e r_e`` when n is not a
    power of 2. Both terms are *sums* over examples and selectors, as in the official code
    (Keras adds them to the batch-mean task loss). Gates and towers are the task
    parameters; shared representation as MMoE (the stacked expert outputs).
    """

    paper = (
        "Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, DSelect-k: "
        "Differentiable Selection in the Mixture of Experts with Applications to Multi-Task "
        "Learning, NeurIPS 2021"
    )

    def __init__(
        self,
        tasks: Sequence[str] | int,
        in_features: int,
        num_experts: int,
        k: int,
        expert: ModuleSpec,
        tower: TowerSpec,
        gamma: float = 1.0,
        entropy_reg: float = 1e-6,
        conditioning: str = "example",
        out_features: int | Mapping[str, int] = 1,
        expert_features: int | None = None,
    ) -> None:
        super().__init__(
            tasks, in_features, num_experts, expert, tower, out_features, expert_features
        )
        check_positive("k", k)
        if k > num_experts:
            raise InvalidHyperparameterError(
                f"k={k} exceeds num_experts={num_experts}; select at most num_experts experts"
            )
        if not (isinstance(entropy_reg, (int, float)) and entropy_reg >= 0):
            raise InvalidHyperparameterError(f"entropy_reg={entropy_reg!r} must be >= 0")
        self.gates = nn.ModuleDict(
            {t: DSelectKGate(num_experts, k, gamma, conditioning, in_features) for t in self.tasks}
        )
        self.k = k
        self.gamma = float(gamma)
        self.entropy_reg = float(entropy_reg)
        self.conditioning = conditioning
        self._routing_input: Tensor | None = None
        self._gated: list[str] = []

    def _weights(self, task: str, gate_input: Tensor) -> Tensor:
        # The regulariser is recomputed from the kept input in aux_loss, on a graph of its
        # own, so that backward on the task losses and on aux_loss can run in any order.
        if self.training:
            self._routing_input = gate_input
            self._gated.append(task)
        weights, _ = self.gates[task](gate_input if self.conditioning == "example" else None)
        return weights

    def forward(self, x: Tensor, task: str | None = None) -> dict[str, Tensor] | Tensor:
        self._gated = []
        return super().forward(x, task)

    def encode(self, x: Tensor) -> Tensor:
        self._gated = []
        return super().encode(x)

    def aux_loss(self) -> Tensor | None:
        """The regularisers of the gates the last training forward used (``None`` after an
        eval forward, or when neither term applies), recomputed from the current gate
        parameters: take it before the optimizer step."""
        total: Tensor | None = None
        for t in dict.fromkeys(self._gated):
            gate = self.gates[t]
            routing = self._routing_input if self.conditioning == "example" else None
            _, selectors = gate(routing)
            term = gate.regularizer(selectors, self.entropy_reg)
            if term is not None:
                total = term if total is None else total + term
        return total

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        task = self.check_task(task)
        yield from self.gates[task].parameters()
        yield from self.towers[task].parameters()
