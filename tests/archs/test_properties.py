"""The shared architecture suite: every registered architecture, on a tiny example.

Checks the contract of :class:`polytask.archs.MultiTaskModel`: one output per task, the
single-task forward equals the full one, shared and task parameters partition the
parameters exactly, a task's own parameters influence only that task's output, gradients
reach every parameter, ``state_dict`` round trip, ``encode``/``decode`` where declared, and
one training step with a params-mode gradient method and with a loss weighting.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import polytask

from ._examples import Example, load_examples

EXAMPLES = load_examples()
ALL = polytask.archs.available()


def build(name: str) -> Example:
    torch.manual_seed(0)
    ex = EXAMPLES[name]()
    ex.model.double()
    ex.x = _to_double(ex.x)
    return ex


def _to_double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_double(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    return x


def task_losses(model, outputs) -> torch.Tensor:
    return torch.stack([outputs[t].double().pow(2).mean() for t in model.tasks])


def test_every_architecture_has_an_example():
    assert sorted(set(ALL) - set(EXAMPLES)) == []
    assert sorted(set(EXAMPLES) - set(ALL)) == []


@pytest.mark.parametrize("name", ALL)
def test_metadata(name):
    cls = polytask.archs.get(name)
    assert cls.name == name
    assert cls.paper and cls.__doc__ and len(cls.__doc__.strip()) > 40


@pytest.mark.parametrize("name", ALL)
def test_outputs_per_task(name):
    ex = build(name)
    ex.model.eval()
    with torch.no_grad():
        out = ex.model(ex.x)
        assert isinstance(out, dict) and list(out) == list(ex.model.tasks)
        for t in ex.model.tasks:
            assert torch.isfinite(out[t]).all(), t
            single = ex.model(ex.x, task=t)
            torch.testing.assert_close(single, out[t], msg=f"forward(x, task={t!r})")


@pytest.mark.parametrize("name", ALL)
def test_unknown_task_is_an_error(name):
    ex = build(name)
    with pytest.raises(polytask.errors.PolytaskError, match="not_a_task"):
        ex.model(ex.x, task="not_a_task")


@pytest.mark.parametrize("name", ALL)
def test_parameters_partition(name):
    ex = build(name)
    ex.model.check_partition()
    assert list(ex.model.shared_parameters()) or ex.model.num_tasks == 1 or name in _NO_SHARED


# Architectures with no trainable shared parameter (pure soft sharing has none shared; RCM's
# shared filter bank is frozen): their training step is each task's own gradient.
_NO_SHARED: set[str] = {"rcm"}


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name):
    ex = build(name)
    ex.model.train()
    out = ex.model(ex.x)
    total = task_losses(ex.model, out).sum()
    aux = ex.model.aux_loss()
    if aux is not None:
        total = total + aux
    total.backward()
    missing = [
        n
        for n, p in ex.model.named_parameters()
        if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))
        if n not in ex.unreached
    ]
    assert missing == []


@pytest.mark.parametrize("name", ALL)
def test_task_parameters_affect_only_their_task(name):
    ex = build(name)
    ex.model.eval()
    out = ex.model(ex.x)
    for t in ex.model.tasks:
        own = list(ex.model.task_parameters(t))
        if not own:
            continue
        for s in ex.model.tasks:
            if s == t:
                continue
            grads = torch.autograd.grad(
                out[s].double().pow(2).mean(), own, retain_graph=True, allow_unused=True
            )
            for g in grads:
                assert g is None or not bool(g.abs().sum() > 0), f"{t}'s params move {s}"


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    ex = build(name)
    ex.model.eval()
    other = build(name).model
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    buffer = io.BytesIO()
    torch.save(ex.model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    other.eval()
    with torch.no_grad():
        a, b = ex.model(ex.x), other(ex.x)
    for t in ex.model.tasks:
        torch.testing.assert_close(a[t], b[t])


@pytest.mark.parametrize("name", ALL)
def test_encode_decode(name):
    ex = build(name)
    if not ex.model.has_shared_representation:
        with pytest.raises(NotImplementedError, match="mode='params'"):
            ex.model.encode(ex.x)
        return
    ex.model.eval()
    with torch.no_grad():
        z = ex.model.encode(ex.x)
        full, decoded = ex.model(ex.x), ex.model.decode(z)
        for t in ex.model.tasks:
            torch.testing.assert_close(decoded[t], full[t])
            torch.testing.assert_close(ex.model.decode(z, task=t), full[t])


@pytest.mark.parametrize("method", ["upgrad", "ew"])
@pytest.mark.parametrize("name", ALL)
def test_one_training_step(name, method):
    ex = build(name)
    model = ex.model
    model.train()
    before = copy.deepcopy(model.state_dict())
    m = polytask.methods.create(method, model.num_tasks)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt.zero_grad()
    losses = task_losses(model, model(ex.x))
    aux = model.aux_loss()
    if name in _NO_SHARED and not any(p.requires_grad for p in model.shared_parameters()):
        losses.sum().backward()
    else:
        m.backward(losses, shared_params=list(model.shared_parameters()) or None)
    if aux is not None:
        aux.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter moved"
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


@pytest.mark.parametrize("name", ALL)
def test_features_mode_step(name):
    ex = build(name)
    model = ex.model
    if not model.has_shared_representation:
        pytest.skip("no single shared representation")
    m = polytask.methods.create("mgda", model.num_tasks)
    z = model.encode(ex.x)
    out = model.decode(z)
    losses = task_losses(model, out)
    m.backward(losses, shared_params=list(model.shared_parameters()), features=z, mode="features")
    for t in model.tasks:
        for p in model.task_parameters(t):
            assert p.grad is not None
