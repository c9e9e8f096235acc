"""Tiny models and independent references for the meta-method tests (Auto-Lambda, MOML,
Sequential Reptile)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call


def tiny_model(k: int, *, seed: int = 0, nonlinear: bool = False) -> nn.ModuleDict:
    """A float64 ``Linear(3, 4)`` encoder (tanh after it if ``nonlinear``) and K linear heads."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {
            "encoder": nn.Linear(3, 4),
            "heads": nn.ModuleList([nn.Linear(4, 1) for _ in range(k)]),
        }
    ).double()
    model.nonlinear = nonlinear
    return model


def linear_model(k: int, *, seed: int = 0) -> nn.ModuleDict:
    """Every task reads one float64 ``Linear(3, 1)``: the squared-error losses are quadratic in
    the parameters (a linear-regression problem), so finite differences of them are exact."""
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {"encoder": nn.Linear(3, 1), "heads": nn.ModuleList([nn.Identity()] * k)}
    ).double()


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, ys = batch
    z = model["encoder"](x)
    if getattr(model, "nonlinear", False):
        z = torch.tanh(z)
    return torch.stack([((h(z) - y) ** 2).mean() for h, y in zip(model["heads"], ys)])


def make_batch(k: int, *, seed: int, n: int = 10, signs=None):
    """Targets y_k = sign_k * (x @ c) + small noise, one common c: related tasks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    c = torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    signs = signs if signs is not None else [1.0] * k
    ys = [s * (x @ c) + 0.1 * torch.randn(n, 1, generator=gen, dtype=torch.float64) for s in signs]
    return x, ys


def copy_with_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Deep copies of the model and of its optimizer (state included), wired to each other."""
    model2, optimizer2 = copy.deepcopy((model, optimizer))
    assert optimizer2.param_groups[0]["params"][0] is next(model2.parameters())
    return model2, optimizer2


def val_after_real_step(model, optimizer, train, val, weights) -> torch.Tensor:
    """V(theta') where theta' is what ``optimizer.step()`` really does on sum_k w_k L_k."""
    model2, optimizer2 = copy_with_optimizer(model, optimizer)
    optimizer2.zero_grad()
    (weights * loss_fn(model2, train)).sum().backward()
    optimizer2.step()
    with torch.no_grad():
        return loss_fn(model2, val)


def hypergradient_by_real_steps(model, optimizer, train, val, weights, combo, h=1e-4):
    """d/dw combo @ V(theta'(w)) by central differences in w, each theta' a real SGD step."""
    out = torch.zeros_like(weights)
    for i in range(weights.numel()):
        e = torch.zeros_like(weights)
        e[i] = h
        plus = combo @ val_after_real_step(model, optimizer, train, val, weights + e)
        minus = combo @ val_after_real_step(model, optimizer, train, val, weights - e)
        out[i] = (plus - minus) / (2 * h)
    return out


def hypergradient_by_unrolled_autograd(model, train, val, weights, combos, lr) -> torch.Tensor:
    """d/dw combos @ V(theta - lr grad sum_k w_k L_k(theta)) by autograd through the plain SGD
    step (``create_graph=True``, the way MOML's official code does it): rows per combination."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().requires_grad_() for p in model.parameters()]
    w = weights.detach().clone().requires_grad_()
    rows = []
    for combo in combos:
        train_losses = _call(model, dict(zip(names, theta)), train)
        grads = torch.autograd.grad((w * train_losses).sum(), theta, create_graph=True)
        stepped = [t - lr * g for t, g in zip(theta, grads)]
        val_losses = _call(model, dict(zip(names, stepped)), val)
        (row,) = torch.autograd.grad(combo @ val_losses, w)
        rows.append(row)
    return torch.stack(rows)


class _Wrapped(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return loss_fn(self.model, batch)


def _call(model, params, batch):
    wrapped = _Wrapped(model)
    return functional_call(wrapped, {f"model.{n}": p for n, p in params.items()}, (batch,))
