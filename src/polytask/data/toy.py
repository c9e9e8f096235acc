"""CAGrad's two-task toy problem: two losses of x in R^2 with conflicting gradients.

The problem of Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021, Fig. 1 (official code: ``toy.py`` of github.com/Cranial-XIX/CAGrad), reused
by Navon et al., "Multi-Task Learning as a Bargaining Game" (Nash-MTL), ICML 2022, and by
Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, who scale the first
loss by 0.1 (their ``--scale`` argument). With x = (x1, x2)::

    u1 = 0.5 (-x1 - 7) - tanh(-x2)            h_1 = log(max(|u1|, 5e-6)) + 6
    u2 = 0.5 (-x1 + 3) + tanh(-x2) + 2        h_2 = log(max(|u2|, 5e-6)) + 6
    q_1 = ((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    q_2 = ((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    c_up = max(tanh(x2 / 2), 0)               c_down = max(tanh(-x2 / 2), 0)
    f_1 = s (c_up h_1 + c_down q_1)           f_2 = c_up h_2 + c_down q_2

with s = 1 in CAGrad (s = 0.1 in Nash-MTL's and FAMO's variant). Above the x1 axis each
loss is a log-valley (h_1 along x1 = -7 + 2 tanh(x2), h_2 along x1 = 7 - 2 tanh(x2)), below
it a quadratic bowl; the valleys trap methods whose update follows one task.

The losses are fed to the method raw, as the official code does (no log, no
normalisation). The official baselines step along the *mean* of the task gradients
((g_1 + g_2) / 2, and CAGrad's direction divided by 1 + c), whereas polytask's EW sums
the losses; under Adam a constant factor on the update changes nothing but the effect of
Adam's eps = 1e-8, which is negligible at these gradient sizes.

Paper setting (:data:`STARTS`, :data:`PAPER_LR`, :data:`PAPER_STEPS`): Adam (torch
defaults, betas (0.9, 0.999), eps 1e-8) with lr 1e-3 for 100,000 steps from (-8.5, 7.5),
(-8.5, -5) and (9, 9). Nash-MTL/FAMO: 35,000/50,000 steps from :data:`NASH_MTL_STARTS`.

Pareto set (worked out here; the official figure draws it as the segment x1 in [-7, 7] at
x2 = -8.3552): below the axis f_k = c_down(x2) (a_k(x1) + b(x2)) with
a_1 = (x1 - 7)^2 / 10, a_2 = (x1 + 7)^2 / 10, b = 0.01 (x2 + 8)^2 - 20. A convex combination
w g_1 + (1 - w) g_2 vanishes iff x1 = 14 w - 7 (so x1 in [-7, 7]) and x2 solves
c_down'(x2) (A + b(x2)) + c_down(x2) b'(x2) = 0 with A = w a_1 + (1 - w) a_2 = (49 - x1^2) / 10.
That root is unique in x2 < 0 and lies in [-8.4345, -8.3551]: -8.3551 at x1 = 0 (the
minimiser of the mean loss, the star in the paper's figure: hence the official constant)
and -8.4345 at x1 = +-7 (the single-task minimisers). Every point above the axis is
dominated (there f_k >= -6.2 while the curve reaches -20), so this curve is the Pareto set.
:func:`pareto_set` samples it; :func:`pareto_stationarity` measures how far a point is from
Pareto-stationarity: the norm of the min-norm point of the segment between the two
gradients (0 iff some convex combination vanishes), from hand-derived gradients
(:func:`toy_gradients`) and the closed-form 2-vector min-norm, independent of polytask's
Jacobian engine and solvers.

Regenerate the recorded endpoints that ``tests/test_toy.py`` checks with::

    python -m polytask.data.toy --regenerate tests/data/toy_endpoints.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from polytask import methods
from polytask.errors import PolytaskError

__all__ = [
    "LOG_LOSS_METHODS",
    "LOWER",
    "METHOD_LR",
    "NASH_MTL_SCALE",
    "NASH_MTL_STARTS",
    "NASH_MTL_STEPS",
    "OFFICIAL_PARETO_X2",
    "PAPER_LR",
    "PAPER_STEPS",
    "REGRESSION_LR",
    "REGRESSION_STEPS",
    "STARTS",
    "TOY_CONTEXT",
    "TOY_HPARAMS",
    "ToyTrajectory",
    "distance_to_pareto_set",
    "pareto_set",
    "pareto_stationarity",
    "pareto_x2",
    "record_endpoints",
    "run_toy",
    "toy_gradients",
    "toy_losses",
    "toy_support",
]

#: Floor of |u| inside the logs (the official ``LOWER``).
LOWER = 5e-6
#: CAGrad's starting points (Fig. 1 and ``run_all`` in the official toy.py).
STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
#: Adam learning rate of the paper's runs (all three papers).
PAPER_LR = 1e-3
#: Number of Adam steps in CAGrad's runs (``n_iter`` in the official toy.py).
PAPER_STEPS = 100_000
#: Nash-MTL's and FAMO's starting points (their ``experiments/toy/trainer.py``).
NASH_MTL_STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
#: Nash-MTL's number of steps (FAMO uses 50,000) and its scale of the first loss.
NASH_MTL_STEPS = 35_000
NASH_MTL_SCALE = 0.1
#: Learning rate of a method's own parameters (UW's log-variances, ...): Nash-MTL's
#: ``--method-params-lr`` default.
METHOD_LR = 0.025
#: The x2 at which the official plotting code draws the Pareto set (a horizontal segment).
OFFICIAL_PARETO_X2 = -8.3552
#: Settings of the recorded-endpoint regression check (shorter than the paper's runs and
#: with a 10x larger step, so every method travels several units in a fraction of a second).
REGRESSION_STEPS = 200
REGRESSION_LR = 1e-2
#: Context keys the toy can pass to ``Method.backward`` (none: it has only the losses).
TOY_CONTEXT: frozenset[str] = frozenset()
#: Hyper-parameters a paper used on this toy problem, where they differ from the method's
#: defaults; :func:`run_toy` applies them unless told otherwise. CAGrad's toy.py calls
#: ``cagrad(grads, c=0.5)`` and divides the update by 1 + c (``rescale=2``).
TOY_HPARAMS: dict[str, dict[str, Any]] = {"cagrad": {"c": 0.5, "rescale": 2}}
#: Methods whose objective takes log L_k without a shift, undefined on the toy's negative
#: losses (FAMO has one: its ``min_losses``, set as in its toy trainer).
LOG_LOSS_METHODS = frozenset({"db_mtl", "gls"})


# -- the problem ---------------------------------------------------------------------------
def toy_losses(x: Tensor, first_loss_scale: float = 1.0) -> Tensor:
    """The two task losses at ``x`` [..., 2]: a tensor [..., 2] (differentiable)."""
    x1, x2 = x[..., 0], x[..., 1]
    t = torch.tanh(-x2)
    h1 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 - 7.0) - t), min=LOWER)) + 6.0
    h2 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 + 3.0) + t + 2.0), min=LOWER)) + 6.0
    c_up = torch.clamp(torch.tanh(0.5 * x2), min=0.0)
    c_down = torch.clamp(torch.tanh(-0.5 * x2), min=0.0)
    shared = 0.1 * (-x2 - 8.0) ** 2
    q1 = ((-x1 + 7.0) ** 2 + shared) / 10.0 - 20.0
    q2 = ((-x1 - 7.0) ** 2 + shared) / 10.0 - 20.0
    f1 = (h1 * c_up + q1 * c_down) * first_loss_scale
    f2 = h2 * c_up + q2 * c_down
    return torch.stack([f1, f2], dim=-1)


def toy_gradients(x: Sequence[float], first_loss_scale: float = 1.0) -> np.ndarray:
    """Gradients of the two losses at one point ``x``, derived by hand: rows are tasks [2, 2].

    Independent of autograd, so tests can check both the losses and polytask's Jacobian
    engine against it. At the kinks (|u_k| = LOWER, x2 = 0) it takes the one-sided
    derivative autograd takes.
    """
    x1, x2 = float(x[0]), float(x[1])
    th = math.tanh(x2)
    sech2 = 1.0 - th * th
    u1 = -0.5 * x1 - 3.5 + th  # 0.5 (-x1 - 7) - tanh(-x2)
    u2 = -0.5 * x1 + 3.5 - th  # 0.5 (-x1 + 3) + tanh(-x2) + 2
    h1 = math.log(max(abs(u1), LOWER)) + 6.0
    h2 = math.log(max(abs(u2), LOWER)) + 6.0
    dh1 = np.array([-0.5, sech2]) / u1 if abs(u1) > LOWER else np.zeros(2)
    dh2 = np.array([-0.5, -sech2]) / u2 if abs(u2) > LOWER else np.zeros(2)
    th_half = math.tanh(0.5 * x2)
    sech2_half = 1.0 - th_half * th_half
    c_up, dc_up = (th_half, 0.5 * sech2_half) if th_half > 0 else (0.0, 0.0)
    c_down, dc_down = (-th_half, -0.5 * sech2_half) if th_half < 0 else (0.0, 0.0)
    q1 = ((x1 - 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    q2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
    dq1 = np.array([(x1 - 7.0) / 5.0, 0.02 * (x2 + 8.0)])
    dq2 = np.array([(x1 + 7.0) / 5.0, 0.02 * (x2 + 8.0)])
    e2 = np.array([0.0, 1.0])
    g1 = c_up * dh1 + h1 * dc_up * e2 + c_down * dq1 + q1 * dc_down * e2
    g2 = c_up * dh2 + h2 * dc_up * e2 + c_down * dq2 + q2 * dc_down * e2
    return np.stack([g1 * first_loss_scale, g2])


def _min_norm_segment(g1: np.ndarray, g2: np.ndarray) -> float:
    """min over w in [0, 1] of ||w g1 + (1 - w) g2||, in closed form."""
    d = g1 - g2
    dd = float(d @ d)
    if dd == 0.0:
        return float(np.linalg.norm(g1))
    w = min(max(-float(g2 @ d) / dd, 0.0), 1.0)
    return float(np.linalg.norm(g2 + w * d))


def pareto_stationarity(x: Sequence[float], first_loss_scale: float = 1.0) -> float:
    """Norm of the min-norm convex combination of the two gradients at ``x`` (0: stationary)."""
    g = toy_gradients(x, first_loss_scale)
    return _min_norm_segment(g[0], g[1])


def _x2_equation(x2: float, a: float) -> float:
    t = math.tanh(-0.5 * x2)
    dt = -0.5 * (1.0 - t * t)
    return dt * (a + 0.01 * (x2 + 8.0) ** 2 - 20.0) + t * 0.02 * (x2 + 8.0)


def pareto_x2(x1: float) -> float:
    """The x2 of the Pareto set above ``x1`` in [-7, 7] (see the module docstring)."""
    if not -7.0 <= x1 <= 7.0:
        raise ValueError(f"x1={x1} is outside [-7, 7], where the Pareto set lies")
    a = (49.0 - x1 * x1) / 10.0
    # The equation is > 0 at x2 = -8 and < 0 at x2 = -12 for every a in [0, 4.9].
    return float(brentq(_x2_equation, -12.0, -8.0, args=(a,), xtol=1e-14, rtol=1e-15))


def pareto_set(num: int = 201) -> np.ndarray:
    """``num`` points [num, 2] along the Pareto set, x1 from -7 to 7."""
    x1 = np.linspace(-7.0, 7.0, num)
    return np.stack([x1, np.array([pareto_x2(float(v)) for v in x1])], axis=1)


_PARETO_POLYLINE: np.ndarray | None = None


def distance_to_pareto_set(x: Sequence[float]) -> float:
    """Euclidean distance from ``x`` to the Pareto set (a fine polyline of it)."""
    global _PARETO_POLYLINE
    if _PARETO_POLYLINE is None:
        _PARETO_POLYLINE = pareto_set(1401)
    p = np.asarray(x, dtype=np.float64)
    a, b = _PARETO_POLYLINE[:-1], _PARETO_POLYLINE[1:]
    ab = b - a
    s = np.clip(np.einsum("ij,ij->i", p - a, ab) / np.einsum("ij,ij->i", ab, ab), 0.0, 1.0)
    closest = a + s[:, None] * ab
    return float(np.min(np.linalg.norm(closest - p, axis=1)))


# -- training through a method ----------------------------------------------------------------
def toy_support(name: str) -> str | None:
    """Why the toy cannot run method ``name``, or ``None`` when it can."""
    cls = methods.get(name)
    modes = getattr(cls, "modes", frozenset({"params"}))
    if "params" not in modes:
        return (
            f"{name} balances only in mode(s) {', '.join(sorted(modes))}, on a shared "
            "representation that task heads read; the toy's losses are functions of x itself"
        )
    if cls.min_tasks > 2:
        return f"{name} needs at least {cls.min_tasks} tasks; the toy has 2"
    if getattr(cls, "needs_meta_step", False):
        return (
            f"{name} learns through meta_step(model, train_batch, val_batch, loss_fn), which "
            "the toy problem (two analytic losses, no model, no data) cannot provide"
        )
    if name in LOG_LOSS_METHODS:
        return (
            f"{name} takes the logarithm of each loss, and the toy's losses go down to -20 "
            "(its papers do not run it on this problem)"
        )
    missing = sorted(set(cls.needs) - TOY_CONTEXT)
    if missing:
        return (
            f"{name} needs {', '.join(missing)} passed to backward(...), which the toy "
            "problem (two analytic losses, no data) cannot provide"
        )
    return None


@dataclass
class ToyTrajectory:
    """One run of :func:`run_toy`.

    Attributes:
        method: registry name of the method.
        start: the starting point.
        steps, lr: Adam steps and learning rate.
        hparams: the method's hyper-parameters (``Method.hparams()``).
        positions: x before the first step and after every step [steps + 1, 2].
        losses: the two losses at each of those positions [steps + 1, 2].
        seconds: wall-clock time of the training loop.
        first_loss_scale: the scale of f_1 (1 in CAGrad, 0.1 in Nash-MTL/FAMO).
        weights: the method's task weights at the last step, or ``None``.
        error: with ``on_error="stop"``, the error that ended the run early (``steps`` then
            counts the steps completed before it), else ``None``.
    """

    method: str
    start: tuple[float, float]
    steps: int
    lr: float
    hparams: dict[str, Any]
    positions: np.ndarray
    losses: np.ndarray
    seconds: float
    first_loss_scale: float = 1.0
    weights: np.ndarray | None = field(default=None)
    error: str | None = None

    @property
    def endpoint(self) -> np.ndarray:
        return self.positions[-1]

    @property
    def final_losses(self) -> np.ndarray:
        return self.losses[-1]

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)

    @property
    def stationarity(self) -> float:
        """:func:`pareto_stationarity` at the endpoint."""
        return pareto_stationarity(self.endpoint, self.first_loss_scale)

    @property
    def distance_to_pareto_set(self) -> float:
        return distance_to_pareto_set(self.endpoint)


def run_toy(
    method_name: str,
    start: Sequence[float] = STARTS[0],
    steps: int = PAPER_STEPS,
    lr: float = PAPER_LR,
    *,
    first_loss_scale: float = 1.0,
    method_lr: float = METHOD_LR,
    dtype: torch.dtype = torch.float64,
    on_error: str = "raise",
    **hparams: Any,
) -> ToyTrajectory:
    """Train x from ``start`` with Adam, taking each update from ``method_name``.

    Each step: ``losses = toy_losses(x)``, then
    ``polytask.methods.create(method_name, 2, **hparams).backward(losses, shared_params=[x])``
    and ``torch.optim.Adam.step()``. A method's own parameters (if any) are trained by the
    same Adam in a second parameter group with ``method_lr``, as Nash-MTL's toy does.
    :data:`TOY_HPARAMS` (the toy settings of the method's paper) are used unless
    ``hparams`` overrides them.

    Departures from the official script, all deliberate: x is float64 (``dtype``) rather
    than float32 so recorded endpoints are reproducible; stochastic methods get ``seed=0``
    unless ``hparams`` sets one; gradient methods compute the Jacobian with the
    ``"loop"`` strategy unless ``hparams`` says otherwise (the ``"auto"`` strategy picks by
    timing, and the two exact paths round differently).

    Args:
        method_name: a registered method (``polytask.methods.available()``).
        start: the initial x (one of :data:`STARTS` in the paper).
        steps: Adam steps (:data:`PAPER_STEPS` in the paper).
        lr: Adam learning rate for x (:data:`PAPER_LR` in the paper).
        first_loss_scale: multiplies f_1 (1 in CAGrad, :data:`NASH_MTL_SCALE` in Nash-MTL).
        method_lr: learning rate of the method's own parameters.
        dtype: floating type of x.
        on_error: ``"raise"`` (default) lets a :class:`~polytask.errors.PolytaskError` from
            the method propagate; ``"stop"`` ends the run there and returns the trajectory
            so far with the error in :attr:`ToyTrajectory.error` (e.g. Nash-MTL raises
            ``SolverError`` once the gradients are opposite, i.e. on the Pareto set).
        **hparams: the method's hyper-parameters.
    Returns:
        The :class:`ToyTrajectory`.
    """
    reason = toy_support(method_name)
    if reason is not None:
        raise ValueError(f"cannot run {method_name!r} on the toy problem: {reason}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr={lr!r} must be a positive finite number")
    if on_error not in ("raise", "stop"):
        raise ValueError(f"on_error={on_error!r} must be 'raise' or 'stop'")
    if len(start) != 2:
        raise ValueError(f"start={start!r} must hold 2 coordinates")
    cls = methods.get(method_name)
    hparams = {**TOY_HPARAMS.get(method_name, {}), **hparams}
    if method_name == "famo":
        # FAMO's toy trainer: set_min_losses([-21 * scale, -21]), below the toy's -20 floor.
        hparams.setdefault("min_losses", [-21.0 * first_loss_scale, -21.0])
    accepted = methods.accepted_hparams(cls)
    if cls.stochastic and "seed" in accepted:
        hparams.setdefault("seed", 0)
    if "jacobian_strategy" in accepted:
        hparams.setdefault("jacobian_strategy", "loop")
    method = methods.create(method_name, 2, **hparams).to(dtype)

    x = torch.tensor([float(start[0]), float(start[1])], dtype=dtype, requires_grad=True)
    groups: list[dict[str, Any]] = [{"params": [x], "lr": lr}]
    own = [p for p in method.parameters() if p.requires_grad]
    if own:
        groups.append({"params": own, "lr": method_lr})
    optimizer = torch.optim.Adam(groups)

    positions = np.empty((steps + 1, 2))
    losses_out = np.empty((steps + 1, 2))
    positions[0] = x.detach().numpy()
    weights = None
    error = None
    done = 0
    t0 = time.perf_counter()
    for i in range(steps):
        optimizer.zero_grad()
        losses = toy_losses(x, first_loss_scale)
        try:
            result = method.backward(losses, shared_params=[x])
        except PolytaskError as exc:
            if on_error == "raise":
                raise
            error = f"{type(exc).__name__} at step {i}: {exc}"
            break
        optimizer.step()
        if method.needs_losses_after_step:
            with torch.no_grad():
                method.after_step(toy_losses(x, first_loss_scale))
        losses_out[i] = losses.detach().numpy()
        positions[i + 1] = x.detach().numpy()
        weights = result.weights
        done = i + 1
    seconds = time.perf_counter() - t0
    positions = positions[: done + 1]
    losses_out = losses_out[: done + 1]
    with torch.no_grad():
        losses_out[done] = toy_losses(x, first_loss_scale).numpy()
    return ToyTrajectory(
        method=method_name,
        start=(float(start[0]), float(start[1])),
        steps=done,
        lr=float(lr),
        hparams=method.hparams(),
        positions=positions,
        losses=losses_out,
        seconds=seconds,
        first_loss_scale=float(first_loss_scale),
        weights=None if weights is None else weights.detach().double().numpy(),
        error=error,
    )


# -- recorded endpoints ------------------------------------------------------------------------
REGENERATE_COMMAND = "python -m polytask.data.toy --regenerate tests/data/toy_endpoints.json"


def _settings() -> dict[str, Any]:
    return {
        "problem": "CAGrad toy (Liu et al., NeurIPS 2021, Fig. 1)",
        "first_loss_scale": 1.0,
        "starts": [list(s) for s in STARTS],
        "steps": REGRESSION_STEPS,
        "lr": REGRESSION_LR,
        "optimizer": "torch.optim.Adam (defaults)",
        "dtype": "float64",
    }


def record_endpoints(names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Endpoints of the regression runs of ``names``; returns (records, errors by name)."""
    records: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            runs = [run_toy(name, s, REGRESSION_STEPS, REGRESSION_LR) for s in STARTS]
        except Exception as exc:  # report every failing method, not just the first
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        records[name] = {
            "endpoints": [[float(v) for v in r.endpoint] for r in runs],
            "hparams": {k: repr(v) for k, v in runs[0].hparams.items()},
        }
    return records, errors


def _regenerate(path: Path, only: Sequence[str] | None) -> int:
    names = list(only) if only else methods.available()
    for name in names:
        try:
            methods.get(name)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    runnable = [n for n in names if toy_support(n) is None]
    skipped = {n: str(toy_support(n)) for n in names if toy_support(n) is not None}
    old: dict[str, Any] = {"methods": {}, "skipped": {}}
    if only and path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") != _settings():
            print(
                f"error: {path} was recorded with other settings; regenerate every method "
                "(leave out --methods)",
                file=sys.stderr,
            )
            return 2
    records, errors = record_endpoints(runnable)
    merged = {k: v for k, v in old["methods"].items() if k not in names}
    merged.update(records)
    old_skipped = {k: v for k, v in old["skipped"].items() if k not in names}
    doc = {
        "_comment": f"Recorded by `{REGENERATE_COMMAND}`; checked by tests/test_toy.py.",
        "settings": _settings(),
        "torch": torch.__version__,
        "skipped": dict(sorted({**old_skipped, **skipped}.items())),
        "methods": dict(sorted(merged.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(records)} method(s) to {path}: {', '.join(records) or 'none'}")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    for name, err in errors.items():
        print(f"FAILED {name}: {err}", file=sys.stderr)
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m polytask.data.toy",
        description="CAGrad's toy problem: record the endpoints tests/test_toy.py checks.",
    )
    parser.add_argument(
        "--regenerate",
        type=Path,
        required=True,
        metavar="JSON",
        help="write the endpoints of every registered method to this file",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated names: update only these entries, keep the others",
    )
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.methods.split(",") if n.strip()] if args.methods else None
    return _regenerate(args.regenerate, only)


if __name__ == "__main__":
    raise SystemExit(main())
