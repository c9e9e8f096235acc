"""Sequential Reptile (Lee, Lee, Lee & Hwang, ICLR 2022): sequential inner steps over tasks,
Reptile outer update."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import polytask
from polytask.errors import InvalidHyperparameterError

from ._meta import linear_model, loss_fn, make_batch, tiny_model


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_update_matches_an_independent_loop():
    """phi <- phi + eta (theta_S - phi), theta_s plain SGD on task t_s's loss of batch s,
    recomputed here with plain tensors and torch.autograd.grad on a copy of the model."""
    k, lr, eta = 3, 0.1, 0.3
    model = tiny_model(k, nonlinear=True)
    batches = [make_batch(k, seed=s) for s in range(4)]
    tasks = [2, 0, 0, 1]
    reference = tiny_model(k, nonlinear=True)
    phi = _params(reference)
    for batch, t in zip(batches, tasks):
        grads = torch.autograd.grad(loss_fn(reference, batch)[t], list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
    expected = phi + eta * (_params(reference) - phi)
    method = polytask.methods.create("sequential_reptile", k, outer_lr=eta)
    result = method.meta_step(model, batches, None, loss_fn, inner_lr=lr, tasks=tasks)
    torch.testing.assert_close(_params(model), expected, rtol=1e-12, atol=1e-14)
    assert result.extras["tasks"].tolist() == tasks and result.weights is None


def test_two_steps_on_linear_regression_in_closed_form():
    """On squared-error linear regression (Hessians H_t = 2/n X^T X) two inner steps on tasks
    a then b give exactly phi - theta_2 = alpha (g_a + g_b) - alpha^2 H_b g_a: the order of the
    tasks enters through the alignment term, which is what makes the trajectory sequential."""
    k, alpha = 2, 0.05
    batches = [make_batch(k, seed=1, signs=[1.0, -0.5]), make_batch(k, seed=2, signs=[1.0, -0.5])]

    def design(x):
        return np.hstack([x.numpy(), np.ones((x.shape[0], 1))])

    def grad_hess(t, batch, task):
        x1, y = design(batch[0]), batch[1][task].numpy()[:, 0]
        n = len(x1)
        return 2 / n * x1.T @ (x1 @ t - y), 2 / n * x1.T @ x1

    for order in ([0, 1], [1, 0]):
        model = linear_model(k)
        t0 = np.concatenate(
            [model["encoder"].weight.detach().numpy()[0], model["encoder"].bias.detach()]
        )
        g_a, _ = grad_hess(t0, batches[0], order[0])
        g_b, h_b = grad_hess(t0, batches[1], order[1])
        shift = alpha * (g_a + g_b) - alpha**2 * h_b @ g_a
        method = polytask.methods.create("sequential_reptile", k, outer_lr=1.0)
        method.meta_step(model, batches, None, loss_fn, inner_lr=alpha, tasks=order)
        np.testing.assert_allclose(_params(model).numpy(), t0 - shift, rtol=1e-12, atol=1e-14)


def test_inner_optimizer_steps_equal_plain_sgd_steps():
    k = 2
    batches = [make_batch(k, seed=s) for s in range(3)]
    a, b = tiny_model(k), tiny_model(k)
    polytask.methods.create("sequential_reptile", k).meta_step(
        a, batches, None, loss_fn, inner_lr=0.1, tasks=[0, 1, 1]
    )
    optimizer = torch.optim.SGD(b.parameters(), lr=0.1)
    polytask.methods.create("sequential_reptile", k).meta_step(
        b, batches, None, loss_fn, inner_optimizer=optimizer, tasks=[0, 1, 1]
    )
    torch.testing.assert_close(_params(a), _params(b), rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in b.parameters())


def test_task_sequence_is_drawn_from_task_probs_under_the_seed():
    k = 3
    batches = [make_batch(k, seed=s) for s in range(40)]
    runs = []
    for _ in range(2):
        method = polytask.methods.create("sequential_reptile", k, seed=4)
        runs.append(method.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3))
    assert torch.equal(runs[0].extras["tasks"], runs[1].extras["tasks"])
    assert set(runs[0].extras["tasks"].tolist()) == {0, 1, 2}
    only_one = polytask.methods.create("sequential_reptile", k, seed=0, task_probs=[0, 0, 5])
    tasks = only_one.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3)
    assert tasks.extras["tasks"].tolist() == [2] * 40
    torch.testing.assert_close(only_one.probs, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_state_dict_round_trip_draws_the_same_tasks():
    k = 3
    batches = [make_batch(k, seed=s) for s in range(6)]
    original = polytask.methods.create("sequential_reptile", k, seed=1)
    original.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = polytask.methods.create("sequential_reptile", k, seed=2)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    a = original.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3)
    b = restored.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3)
    assert torch.equal(a.extras["tasks"], b.extras["tasks"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_method_moved_to_the_gpu_draws_the_same_tasks():
    """``method.to("cuda")`` moves the ``probs`` buffer, but the generator stays on the CPU:
    the draw must still work, and give the tasks of a CPU method with the same seed."""
    k = 3
    batches = [make_batch(k, seed=s) for s in range(5)]
    on_cpu = polytask.methods.create("sequential_reptile", k, seed=4)
    on_gpu = polytask.methods.create("sequential_reptile", k, seed=4).to("cuda")
    a = on_cpu.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3)
    b = on_gpu.meta_step(tiny_model(k), batches, None, loss_fn, inner_lr=1e-3)
    assert torch.equal(a.extras["tasks"], b.extras["tasks"])


def test_backward_is_equal_weighting_and_says_so():
    k = 2
    model = tiny_model(k)
    method = polytask.methods.create("sequential_reptile", k)
    assert method.needs_meta_step and method.meta_step_replaces_step
    result = method.backward(
        loss_fn(model, make_batch(k, seed=0)), shared_params=model["encoder"].parameters()
    )
    torch.testing.assert_close(result.weights, torch.ones(k, dtype=torch.float64))
    assert "meta_step" in result.extras["note"]


def test_bad_meta_step_inputs():
    k = 2
    method = polytask.methods.create("sequential_reptile", k)
    model = tiny_model(k)
    batches = [make_batch(k, seed=s) for s in range(2)]
    with pytest.raises(ValueError, match="val_batch=None"):
        method.meta_step(model, batches, batches[0], loss_fn, inner_lr=0.1)
    with pytest.raises(ValueError, match="tasks has 1 entries but train_batch has 2"):
        method.meta_step(model, batches, None, loss_fn, inner_lr=0.1, tasks=[0])
    with pytest.raises(ValueError, match=r"2 is not a task index in \[0, 1\]"):
        method.meta_step(model, batches, None, loss_fn, inner_lr=0.1, tasks=[0, 2])
    with pytest.raises(ValueError, match="empty"):
        method.meta_step(model, [], None, loss_fn, inner_lr=0.1)
    with pytest.raises(TypeError, match="sequence of the inner steps' batches"):
        method.meta_step(model, iter(batches), None, loss_fn, inner_lr=0.1)
    with pytest.raises(TypeError, match="exactly one of inner_lr"):
        method.meta_step(model, batches, None, loss_fn)

    def short_on_marked(m, b):
        return loss_fn(m, b[1])[:1] if isinstance(b[0], str) else loss_fn(m, b)

    with pytest.raises(ValueError, match=r"train_batch\[1\].*2 task losses"):
        method.meta_step(
            model, [batches[0], ("short", batches[1])], None, short_on_marked, inner_lr=0.1
        )


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        (dict(outer_lr=0.0), r"outer_lr=0.0 must lie in \(0, 1\]"),
        (dict(outer_lr=1.5), "outer_lr=1.5"),
        (dict(task_probs=[1.0]), r"task_probs=\[1.0\] must hold 2 probabilities"),
        # Not numbers: the error names the value instead of a bare ValueError.
        (dict(task_probs="ab"), "task_probs='ab' must hold 2"),
        (dict(task_probs=[1.0, -1.0]), "non-negative"),
        (dict(task_probs=[0.0, 0.0]), "not all zero"),
    ],
)
def test_bad_hyperparameters(hparams, match):
    with pytest.raises(InvalidHyperparameterError, match=match):
        polytask.methods.create("sequential_reptile", 2, **hparams)
