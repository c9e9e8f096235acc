"""SRDML's saliency-similarity regulariser (Bai & Zhao, KDD 2022), by hand."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import PolytaskError
from polytask.regularizers import SRDML, saliency


def test_linear_heads_have_their_weights_as_saliency():
    z = torch.randn(4, 3, requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    outs = [z @ w[t] for t in range(3)]
    torch.testing.assert_close(saliency(outs[0], z), w[0].expand(4, 3))
    reg = SRDML(3)
    with torch.no_grad():
        reg.relation.copy_(torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0], [9.0, 9.0, 0.0]]))
    # pairs (0,1), (0,2), (1,2) with c = 1, 3, 0; |w0 - w1|_1 = 2, |w0 - w2|_1 = 2
    expected = 4 * (1 / 4 * 2 + 3 / 4 * 2 + 0)
    assert reg(outs, z).item() == pytest.approx(expected)


def test_feature_maps_sum_the_gradient_over_positions():
    f = torch.randn(2, 2, 3, 3, requires_grad=True)
    v = torch.randn(2, 3, 3)
    out = (f * v).sum(dim=(1, 2, 3))
    torch.testing.assert_close(saliency(out, f), v.sum(dim=(1, 2)).expand(2, 2))


def test_relation_gradient_matches_the_official_analytic_update():
    z = torch.randn(5, 4, requires_grad=True)
    heads = torch.randn(3, 4)
    reg = SRDML(3)
    with torch.no_grad():
        reg.relation.copy_(torch.rand(3, 3) + 0.5)
    value = reg([z @ h for h in heads], z)
    (grad,) = torch.autograd.grad(value, reg.relation)
    u, v = torch.triu_indices(3, 3, offset=1)
    c = reg.relation.detach()[u, v]
    d = torch.stack([(heads[a] - heads[b]).abs().sum() * 5 for a, b in zip(u, v)])
    e = (c * d).sum() / c.sum() ** 2  # official: G = D / c_sum - E
    torch.testing.assert_close(grad[u, v], d / c.sum() - e)
    assert bool((grad.tril() == 0).all())


def test_regulariser_trains_the_heads_and_projection_keeps_relations_non_negative():
    z = torch.randn(3, 2, requires_grad=True)
    heads = torch.randn(2, 2, requires_grad=True)
    reg = SRDML(2)
    value = reg([z @ heads[0], z @ heads[1]], z)
    (g,) = torch.autograd.grad(value, heads)
    torch.testing.assert_close(g[0], 3 * torch.sign(heads[0] - heads[1]).detach())
    with torch.no_grad():
        reg.relation.fill_(-1.0)
    reg.project_()
    assert bool((reg.relation == 0).all())
    with pytest.raises(PolytaskError, match="positive sum"):
        reg([z @ heads[0], z @ heads[1]], z)


def test_inputs_are_checked():
    z = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(PolytaskError, match="one scalar per sample"):
        saliency(z @ torch.randn(2, 2), z)
    with pytest.raises(PolytaskError, match="2 tasks"):
        SRDML(2)([z.sum(1)], z)
