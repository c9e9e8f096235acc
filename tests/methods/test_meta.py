"""The meta-step machinery shared by the bi-level methods (``polytask.methods.meta``): the
look-ahead hyper-gradient, the SGD virtual step, the checks and the module's example."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import polytask
import polytask.methods.meta as meta
from polytask.errors import EmptyParametersError, InvalidLossesError, NonFiniteError
from polytask.methods.meta import FunctionalModel, MetaMethod, lookahead_hypergradient

from ._meta import (
    hypergradient_by_real_steps,
    hypergradient_by_unrolled_autograd,
    linear_model,
    loss_fn,
    make_batch,
    tiny_model,
    val_after_real_step,
)

META = [n for n in polytask.methods.available() if polytask.methods.get(n).needs_meta_step]

# (SGD keyword arguments, whether to take one real step first so a momentum buffer exists)
SGD_SETTINGS = [
    (dict(lr=0.1), False),
    (dict(lr=0.05, momentum=0.9, weight_decay=1e-2), False),
    (dict(lr=0.05, momentum=0.9, weight_decay=1e-2), True),
    (dict(lr=0.05, momentum=0.9, dampening=0.3), True),
    (dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-3), True),
]


def _hyper(model, train, val, weights, combos, hessian, **inner):
    fmodel = FunctionalModel(model, loss_fn, len(weights), "test")
    return lookahead_hypergradient(
        fmodel,
        train,
        val,
        weights,
        combos,
        inner_lr=inner.get("inner_lr"),
        inner_optimizer=inner.get("inner_optimizer"),
        hessian=hessian,
    )


def test_meta_methods_are_the_registered_meta_step_ones():
    assert {"auto_lambda", "moml", "sequential_reptile"} <= set(META)
    for name in polytask.methods.available():
        cls = polytask.methods.get(name)
        assert cls.needs_meta_step == issubclass(cls, MetaMethod), name


@pytest.mark.parametrize("hessian", ["exact", "finite_difference"])
@pytest.mark.parametrize(("sgd", "warm"), SGD_SETTINGS)
def test_hypergradient_equals_real_sgd_steps(sgd, warm, hessian):
    """d/dw of combinations of V(theta'(w)), where theta' is what torch's SGD really does
    (momentum buffer, dampening, Nesterov, weight decay), found here by differentiating over w
    with real optimizer steps on copies. theta' is affine in w, and for the finite-difference
    Hessian the problem is a linear regression whose losses are quadratic in theta, so the
    central differences of the reference (in w) and of the official approximation (in theta)
    are exact."""
    k = 3
    model = tiny_model(k) if hessian == "exact" else linear_model(k)
    optimizer = torch.optim.SGD(model.parameters(), **sgd)
    if warm:
        optimizer.zero_grad()
        loss_fn(model, make_batch(k, seed=99)).sum().backward()
        optimizer.step()
    train, val = make_batch(k, seed=1), make_batch(k, seed=2)
    weights = torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64)
    combos = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, -1.0]], dtype=torch.float64)
    hyper, val_losses, train_losses = _hyper(
        model, train, val, weights, combos, hessian, inner_optimizer=optimizer
    )
    for row, combo in zip(hyper, combos):
        expected = hypergradient_by_real_steps(model, optimizer, train, val, weights, combo)
        torch.testing.assert_close(row, expected, rtol=1e-6, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(train_losses, loss_fn(model, train))
    real = val_after_real_step(model, optimizer, train, val, weights)
    torch.testing.assert_close(val_losses, real, rtol=1e-12, atol=1e-14)


def test_exact_hypergradient_matches_unrolled_autograd_on_a_nonlinear_model():
    """On a tanh network: ``"exact"`` equals autograd through the unrolled step (second order,
    create_graph) to round-off; the official finite difference is close, not equal."""
    k = 2
    model = tiny_model(k, nonlinear=True)
    train, val = make_batch(k, seed=3), make_batch(k, seed=4)
    weights = torch.tensor([0.1, 0.4], dtype=torch.float64)
    combos = torch.eye(k, dtype=torch.float64)
    expected = hypergradient_by_unrolled_autograd(model, train, val, weights, combos, 0.2)
    exact, _, _ = _hyper(model, train, val, weights, combos, "exact", inner_lr=0.2)
    torch.testing.assert_close(exact, expected, rtol=1e-10, atol=1e-12)
    approx, _, _ = _hyper(model, train, val, weights, combos, "finite_difference", inner_lr=0.2)
    torch.testing.assert_close(approx, expected, rtol=1e-3, atol=1e-6)
    assert not torch.equal(approx, exact)


def test_parameters_outside_the_optimizer_stay_fixed_in_the_virtual_step():
    """The heads are not in the optimizer: the real step leaves them alone, so must the
    look-ahead (the reference differentiates real steps of that optimizer)."""
    k = 2
    model = tiny_model(k)
    optimizer = torch.optim.SGD(model["encoder"].parameters(), lr=0.1)
    train, val = make_batch(k, seed=5), make_batch(k, seed=6)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    combo = torch.ones(1, k, dtype=torch.float64)
    hyper, _, _ = _hyper(model, train, val, weights, combo, "exact", inner_optimizer=optimizer)
    expected = hypergradient_by_real_steps(model, optimizer, train, val, weights, combo[0])
    torch.testing.assert_close(hyper[0], expected, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["auto_lambda", "moml"])
def test_meta_step_leaves_the_model_untouched(name):
    """Parameters, their .grad, BatchNorm running statistics and the optimizer's state are as
    before: the virtual and perturbed forwards run on substituted parameters and buffers."""
    k = 2
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            "heads": nn.ModuleList([nn.Linear(4, 1) for _ in range(k)]),
        }
    ).double()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for hessian in ("exact", "finite_difference"):
        method = polytask.methods.create(name, k, hessian=hessian)
        batches = make_batch(k, seed=1), make_batch(k, seed=2)
        method.meta_step(model, *batches, loss_fn, inner_optimizer=optimizer)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert not optimizer.state


@pytest.mark.parametrize("name", ["auto_lambda", "moml"])
def test_loading_a_live_state_dict_does_not_alias_the_meta_optimizer(name):
    """``b.load_state_dict(a.state_dict())`` copies a's Adam moments, as it copies a's weights:
    b's meta steps leave a's moments, step count and next meta step unchanged."""
    k = 2
    model = tiny_model(k)
    batches = make_batch(k, seed=1), make_batch(k, seed=2)
    source = polytask.methods.create(name, k)
    for _ in range(2):
        source.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    param = next(iter(source.parameters()))
    moments = {key: t.clone() for key, t in source._meta_optimizer.state[param].items()}
    twin = polytask.methods.create(name, k)
    twin.load_state_dict(source.state_dict())
    twin.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    for key, t in source._meta_optimizer.state[param].items():
        assert torch.equal(t, moments[key]), key
    expected = twin.meta_step(model, *batches, loss_fn, inner_lr=0.1).weights
    restored = polytask.methods.create(name, k)
    restored.load_state_dict(source.state_dict())
    restored.meta_step(model, *batches, loss_fn, inner_lr=0.1)
    assert torch.equal(restored.meta_step(model, *batches, loss_fn, inner_lr=0.1).weights, expected)


def test_finite_differences_share_dropout_masks():
    """With dropout, the two perturbed forwards of a central difference must see the same
    mask, or the difference is noise of order 1 / eps. With shared masks the estimate stays
    on the scale of the exact one (computed here with the dropout off, same model)."""
    k = 2
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "encoder": nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.3)),
            "heads": nn.ModuleList([nn.Linear(16, 1) for _ in range(k)]),
        }
    ).double()
    train, val = make_batch(k, seed=1), make_batch(k, seed=2)
    weights = torch.tensor([0.5, 0.5], dtype=torch.float64)
    combo = torch.ones(1, k, dtype=torch.float64)
    fd, _, _ = _hyper(model, train, val, weights, combo, "finite_difference", inner_lr=0.1)
    model.eval()
    exact, _, _ = _hyper(model, train, val, weights, combo, "exact", inner_lr=0.1)
    assert float((fd - exact).abs().max()) < 2 * float(exact.abs().max())


def test_module_example_runs():
    failures, tried = doctest.testmod(meta, verbose=False)
    assert tried > 5 and failures == 0


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auto_lambda", "moml"])
def test_inner_step_arguments_are_checked(name):
    m = polytask.methods.create(name, 2)
    model = tiny_model(2)
    batches = make_batch(2, seed=0), make_batch(2, seed=1)
    other = list(tiny_model(2).parameters())

    def step(**kw):
        return m.meta_step(model, *batches, loss_fn, **kw)

    with pytest.raises(TypeError, match=r"exactly one of inner_lr.*both"):
        step(inner_lr=0.1, inner_optimizer=torch.optim.SGD(other, lr=0.1))
    with pytest.raises(TypeError, match="neither"):
        step()
    with pytest.raises(ValueError, match=r"inner_lr=-1\.0"):
        step(inner_lr=-1.0)
    with pytest.raises(TypeError, match=r"Adam.*SGD step"):
        step(inner_optimizer=torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="holds none of the model"):
        step(inner_optimizer=torch.optim.SGD(other, lr=0.1))
    with pytest.raises(ValueError, match="maximize"):
        step(inner_optimizer=torch.optim.SGD(model.parameters(), maximize=True))


@pytest.mark.parametrize("name", ["auto_lambda", "moml"])
def test_bad_batches_models_and_loss_functions_are_named(name):
    m = polytask.methods.create(name, 2)
    model = tiny_model(2)
    train, val = make_batch(2, seed=0), make_batch(2, seed=1)
    with pytest.raises(ValueError, match="needs val_batch"):
        m.meta_step(model, train, None, loss_fn, inner_lr=0.1)
    with pytest.raises(InvalidLossesError, match=r"train_batch.*2 task losses.*\(3,\)"):
        m.meta_step(
            model,
            train,
            val,
            lambda mod, b: torch.cat([loss_fn(mod, b), loss_fn(mod, b)[:1]]),
            inner_lr=0.1,
        )
    with pytest.raises(InvalidLossesError, match="do not require grad"):
        m.meta_step(model, train, val, lambda mod, b: loss_fn(mod, b).detach(), inner_lr=0.1)
    nan_val = make_batch(2, seed=1)
    nan_val[1][1][0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"val_batch.*task\(s\) \[1\]"):
        m.meta_step(model, train, nan_val, loss_fn, inner_lr=0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        m.meta_step(model, train, val, "mse", inner_lr=0.1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        m.meta_step(lambda b: b, train, val, loss_fn, inner_lr=0.1)
    with pytest.raises(EmptyParametersError, match="no parameter that requires grad"):
        m.meta_step(tiny_model(2).requires_grad_(False), train, val, loss_fn, inner_lr=0.1)
