"""fp16 loss scaling: with losses scaled by S and ``loss_scale=S``, every method balances the
true gradients and leaves S x the unscaled step's gradients in ``.grad`` (GradScaler's
convention), so ``scaler.unscale_`` recovers the exact update."""

from __future__ import annotations

import pytest
import torch

import polytask

from ._helpers import make, method_ctx, tiny_problem

SCALE = 1024.0  # a power of two: scaling is exact in floating point

NAMES = [
    n
    for n in polytask.methods.available()
    if not polytask.methods.get(n).needs_meta_step
    and "sample_losses" not in polytask.methods.get(n).needs
]


def _step(name, mode, scale):
    k = max(3, polytask.methods.get(name).min_tasks)
    problem = tiny_problem(k, seed=2)
    method = make(name, k, seed=5)
    results = []
    for _ in range(2):  # two steps: state carried between steps sees true values
        problem.zero_grad()
        features = problem.encoder(problem.x)
        task = [((h(features) - y) ** 2).mean() for h, y in zip(problem.heads, problem.ys)]
        losses = torch.stack([t * scale for t in task]) if scale else torch.stack(task)
        ctx = method_ctx(method, k)
        if scale:
            ctx["loss_scale"] = scale
        result = method.backward(
            losses,
            shared_params=problem.shared(),
            features=features if mode == "features" else None,
            mode=mode,
            **ctx,
        )
        if method.needs_losses_after_step:
            with torch.no_grad():
                method.after_step(problem.forward()[0])
        # The method's own parameters too (UW, IMTL-L, IMTL's scales, GradNorm's weights):
        # GradScaler unscales every gradient of the optimizer.
        own = [p.grad.clone() for p in method.parameters() if p.grad is not None]
        results.append((result, [p.grad.clone() for p in problem.parameters()] + own))
    return results


@pytest.mark.parametrize("name", NAMES)
def test_scaled_losses_give_scaled_grads_and_the_same_weights(name):
    for mode in sorted(polytask.methods.get(name).modes):
        plain, scaled = _step(name, mode, None), _step(name, mode, SCALE)
        for (r0, g0), (r1, g1) in zip(plain, scaled):
            assert len(g0) == len(g1)
            for a, b in zip(g0, g1):
                torch.testing.assert_close(b, SCALE * a, rtol=1e-7, atol=1e-9)
            if r0.weights is not None:
                torch.testing.assert_close(r1.weights, r0.weights, rtol=1e-7, atol=1e-12)


def test_overflow_leaves_nan_for_the_scaler_to_skip():
    # float32: the scaled losses are finite (4e10), the scaled gradient 1e40 is not.
    w = torch.full((4,), 1e-30, requires_grad=True)
    scale = 1e10
    losses = torch.stack([1e30 * w.sum() * scale, w.sum() * scale])
    result = polytask.methods.create("mgda", 2).backward(
        losses, shared_params=[w], loss_scale=scale
    )
    assert result.extras["found_inf"] and result.weights is None
    assert torch.isnan(w.grad).all()
