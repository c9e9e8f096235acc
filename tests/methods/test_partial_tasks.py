"""Steps that hold only some tasks (``present=``, multi-input MTL).

A method with ``partial_tasks = True`` must treat a step with present=[T, F, T] exactly as the
same method, fresh, on the two present tasks: same shared gradient, the absent task's head
untouched, weight 0 for the absent task. Every other method refuses such a step, naming itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polytask
from polytask.errors import InvalidContextError, NonFiniteError
from polytask.methods import LossMethod
from polytask.methods.mgda import MGDA

from ._helpers import make, method_ctx, tiny_problem

ALL = polytask.methods.available()
PARTIAL = [n for n in ALL if polytask.methods.get(n).partial_tasks]
REFUSING = [n for n in ALL if not polytask.methods.get(n).partial_tasks]
PRESENT = torch.tensor([True, False, True])
KEEP = [0, 2]


def _modes(name: str) -> list[str]:
    return sorted(polytask.methods.get(name).modes)


def _call(method, losses, problem, mode, features, **ctx):
    return method.backward(
        losses,
        shared_params=problem.shared(),
        features=features if mode == "features" else None,
        mode=mode,
        **ctx,
    )


def _step_without_task_1(problem, fill: float = 0.0):
    """Losses and features of a step where task 1 has no data: its head is not run and its
    entry of ``losses`` is a constant placeholder, as in a multi-input training loop."""
    features = problem.encoder(problem.x)
    own = [((h(features) - y) ** 2).mean() for h, y in zip(problem.heads, problem.ys)]
    placeholder = torch.tensor(fill, dtype=own[0].dtype)
    return torch.stack([own[0], placeholder, own[2]]), features


def _partial_vs_fresh(name: str, mode: str, hparams_3: dict, hparams_2: dict, seed: int = 5):
    """(result, grads) of a [T, F, T] step with K=3 and of a fresh K=2 method on tasks 0, 2."""
    problem = tiny_problem(3, seed=1)
    method = make(name, 3, seed=seed, **hparams_3)
    losses, features = _step_without_task_1(problem)
    partial = _call(method, losses, problem, mode, features, present=PRESENT)
    got = problem.grads()

    problem.zero_grad()
    fresh = make(name, 2, seed=seed, **hparams_2)
    losses, features = problem.forward()
    reference = _call(fresh, losses[KEEP], problem, mode, features)
    return partial, got, reference, problem.grads(), problem


def _assert_same_step(partial, got, reference, expected, problem):
    head1 = {id(p) for p in problem.heads[1].parameters()}
    for p, g, e in zip(problem.parameters(), got, expected, strict=True):
        if id(p) in head1:
            assert g is None, "the absent task's head got a gradient"
        else:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert partial.extras["tasks"].tolist() == KEEP
    if reference.weights is None:
        assert partial.weights is None
    else:
        assert partial.weights.shape == (3,)
        assert partial.weights[1] == 0
        torch.testing.assert_close(partial.weights[KEEP], reference.weights)


@pytest.mark.parametrize("name", PARTIAL)
def test_partial_step_is_the_method_on_the_present_tasks(name):
    for mode in _modes(name):
        _assert_same_step(*_partial_vs_fresh(name, mode, {}, {}))


@pytest.mark.parametrize(
    ("name", "hparams_3", "hparams_2"),
    [
        ("ew", {"weights": [1.0, 5.0, 3.0]}, {"weights": [1.0, 3.0]}),
        ("upgrad", {"pref_vector": [0.2, 0.5, 0.3]}, {"pref_vector": [0.2, 0.3]}),
        ("config", {"pref_vector": [1.0, 4.0, 2.0]}, {"pref_vector": [1.0, 2.0]}),
        ("aligned_mtl", {"pref_vector": [1.0, 4.0, 2.0]}, {"pref_vector": [1.0, 2.0]}),
        ("graddrop", {"leak": [0.1, 0.9, 0.5]}, {"leak": [0.1, 0.5]}),
        ("mgda", {"normalization": "loss"}, {"normalization": "loss"}),
    ],
)
def test_per_task_hyperparameters_are_restricted_to_the_present_tasks(name, hparams_3, hparams_2):
    if name not in PARTIAL:
        pytest.skip(f"{name} does not support partial steps")
    for mode in _modes(name):
        _assert_same_step(*_partial_vs_fresh(name, mode, hparams_3, hparams_2))


@pytest.mark.parametrize("name", PARTIAL)
def test_absent_losses_are_never_read(name):
    problem = tiny_problem(3, seed=1)
    losses, _ = _step_without_task_1(problem, float("nan"))
    result = make(name, 3).backward(losses, shared_params=problem.shared(), present=PRESENT)
    assert all(torch.isfinite(p.grad).all() for p in problem.shared())
    assert result.weights is None or result.weights[1] == 0


def test_a_present_task_with_a_non_finite_loss_is_named_by_its_own_index():
    problem = tiny_problem(3, seed=1)
    losses, _ = problem.forward()
    bad = losses * torch.tensor([1.0, 1.0, float("inf")], dtype=losses.dtype)
    with pytest.raises(NonFiniteError, match="task 2"):
        make("mgda", 3).backward(bad, shared_params=problem.shared(), present=PRESENT)


def test_every_task_present_is_the_ordinary_step():
    problem = tiny_problem(3, seed=1)
    losses, _ = problem.forward()
    a = make("upgrad", 3).backward(
        losses, shared_params=problem.shared(), present=torch.ones(3, dtype=torch.bool)
    )
    first = problem.grads()
    problem.zero_grad()
    losses, _ = problem.forward()
    b = make("upgrad", 3).backward(losses, shared_params=problem.shared())
    torch.testing.assert_close(a.weights, b.weights)
    for g, h in zip(first, problem.grads(), strict=True):
        torch.testing.assert_close(g, h)
    assert "tasks" not in a.extras


def test_partial_steps_draw_from_the_methods_own_generator():
    """A seeded stochastic method stays reproducible across partial and full steps, and a
    partial step advances its generator (the sub-problem does not reseed)."""
    runs = []
    for _ in range(2):
        problem = tiny_problem(3, seed=2)
        method = make("pcgrad", 3, seed=11)
        start = method.generator.get_state()
        grads = []
        for present in (PRESENT, None, PRESENT):
            problem.zero_grad()
            losses, _ = _step_without_task_1(problem) if present is not None else problem.forward()
            method.backward(losses, shared_params=problem.shared(), present=present)
            grads.append(problem.shared_grad())
            if present is PRESENT:
                assert not torch.equal(method.generator.get_state(), start)
        runs.append(grads)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_task_context_is_restricted_to_the_present_tasks():
    """Context values with one entry per task reach the sub-problem reduced to its tasks."""
    from polytask.methods.base import _select_tasks

    index = torch.tensor([0, 2])
    kpis = torch.tensor([0.1, 0.2, 0.3])
    torch.testing.assert_close(_select_tasks("kpis", kpis, index), torch.tensor([0.1, 0.3]))
    samples = [torch.ones(2), torch.zeros(3), torch.full((4,), 2.0)]
    assert [len(s) for s in _select_tasks("sample_losses", samples, index)] == [2, 4]
    jac = torch.arange(6.0).view(3, 2)
    pair = _select_tasks("xi_jacobians", (jac, 2 * jac), index)
    torch.testing.assert_close(pair[1], 2 * jac[[0, 2]])
    assert _select_tasks("epoch", 4, index) == 4


@pytest.mark.parametrize("name", REFUSING)
def test_methods_without_partial_support_refuse_naming_themselves(name):
    cls = polytask.methods.get(name)
    k = max(3, cls.min_tasks)
    method = make(name, k)
    try:
        ctx = method_ctx(method, k)
    except AssertionError:
        pytest.skip(f"the suite cannot build the context {name} needs")
    present = torch.ones(k, dtype=torch.bool)
    present[1] = False
    problem = tiny_problem(k)
    losses, features = problem.forward()
    with pytest.raises(InvalidContextError, match=type(method).__name__):
        method.backward(
            losses,
            shared_params=problem.shared(),
            features=features,
            mode=_modes(name)[-1],
            present=present,
            **ctx,
        )


# -- the opt-in mechanism for stateful methods and its guards ------------------------------------


class _ScaledLosses(LossMethod):
    """sum_k exp(-s_k) L_k + s_k with learnable s (UW-like state), opting in correctly."""

    paper = "test double"
    partial_tasks = True

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(num_tasks, **kwargs)
        self.s = nn.Parameter(torch.zeros(num_tasks, dtype=torch.float64))

    def objective(self, losses, **ctx):
        w = torch.exp(-self.s)
        return (w * losses + self.s).sum(), w.detach()

    def _partial_objective(self, losses, index, **ctx):
        w = torch.exp(-self.s[index])
        weights = torch.zeros(self.num_tasks, dtype=w.dtype)
        weights[index] = w.detach()
        return (w * losses[index] + self.s[index]).sum(), weights


def test_a_stateful_method_opts_in_by_updating_only_the_present_tasks_state():
    problem = tiny_problem(3, seed=1)
    method = _ScaledLosses(3)
    losses, _ = _step_without_task_1(problem)
    result = method.backward(losses, shared_params=problem.shared(), present=PRESENT)
    assert method.s.grad[1] == 0 and bool((method.s.grad[KEEP] != 0).all())
    assert result.weights.tolist() == [1.0, 0.0, 1.0]
    assert all(p.grad is None for p in problem.heads[1].parameters())


def test_weights_of_absent_tasks_must_be_zero():
    class Leaky(_ScaledLosses):
        def _partial_objective(self, losses, index, **ctx):
            total, _ = super()._partial_objective(losses, index, **ctx)
            return total, torch.ones(self.num_tasks, dtype=torch.float64)

    problem = tiny_problem(3, seed=1)
    losses, _ = _step_without_task_1(problem)
    with pytest.raises(RuntimeError, match="not 0 for the absent tasks"):
        Leaky(3).backward(losses, shared_params=problem.shared(), present=PRESENT)


def test_the_fresh_instance_path_refuses_learnable_state_and_unknown_per_task_hparams():
    class Forgetful(_ScaledLosses):
        _partial_objective = LossMethod._partial_objective

    class PerTask(LossMethod):
        paper = "test double"
        partial_tasks = True

        def __init__(self, num_tasks, *, scales=(1.0, 1.0, 1.0), **kwargs):
            super().__init__(num_tasks, **kwargs)
            self.scales = scales

        def objective(self, losses, **ctx):
            w = torch.as_tensor(self.scales, dtype=losses.dtype)
            return (w * losses).sum(), w

    problem = tiny_problem(3, seed=1)
    losses, _ = _step_without_task_1(problem)
    with pytest.raises(NotImplementedError, match="learnable parameters"):
        Forgetful(3).backward(losses, shared_params=problem.shared(), present=PRESENT)
    with pytest.raises(NotImplementedError, match="scales="):
        PerTask(3).backward(losses, shared_params=problem.shared(), present=PRESENT)


def test_too_few_present_tasks_for_the_method():
    class PairsOnly(MGDA):
        min_tasks = 2

    problem = tiny_problem(3, seed=1)
    losses, _ = problem.forward()
    only_one = torch.tensor([False, True, False])
    with pytest.raises(InvalidContextError, match="at least 2 tasks"):
        PairsOnly(3).backward(losses, shared_params=problem.shared(), present=only_one)


def test_a_backward_that_bypasses_the_partial_path_is_caught():
    class Bypass(_ScaledLosses):
        def backward(self, losses, *, shared_params, features=None, mode="params", **ctx):
            losses, _ = self._validate(losses, shared_params, mode, features, ctx)
            return super().backward(losses, shared_params=shared_params)

    problem = tiny_problem(3, seed=1)
    losses, _ = _step_without_task_1(problem)
    with pytest.raises(NotImplementedError, match="Bypass sets partial_tasks=True"):
        Bypass(3).backward(losses, shared_params=problem.shared(), present=PRESENT)
