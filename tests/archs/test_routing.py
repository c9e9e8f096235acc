"""Paper-specific checks of task routing (Strezoski et al., ICCV 2019) and learned branching
(Guo et al., ICML 2020)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.archs.routing import TaskRouting, routing_masks
from polytask.archs.routing_branching import BranchedTree, LearnToBranch
from polytask.errors import InvalidHyperparameterError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- task routing --------------------------------------------------------------------------


@pytest.mark.parametrize(("units", "sigma"), [(10, 0.5), (7, 0.3), (64, 0.9), (5, 0.0)])
def test_masks_keep_the_ratio_exactly(units, sigma):
    masks = routing_masks(6, units, sigma, torch.Generator().manual_seed(1))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks == 0).sum(dim=1).tolist() == [int(units * sigma)] * 6


def test_masks_are_fixed_by_the_seed_and_differ_between_tasks():
    a = TaskRouting(4, channels=(16, 32), seed=3)
    b = TaskRouting(4, channels=(16, 32), seed=3)
    for ra, rb in zip(a.routers, b.routers):
        torch.testing.assert_close(ra.masks, rb.masks)
    masks = a.routers[1].masks
    assert len({tuple(m.tolist()) for m in masks}) == 4
    assert "routers.0.masks" in a.state_dict()
    assert all(not n.startswith("routers") for n, _ in a.named_parameters())
    with pytest.raises(InvalidHyperparameterError, match=r"sigma=1\.0"):
        TaskRouting(2, sigma=1.0)


def test_each_task_sees_only_its_routed_units():
    stages = [nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1)]
    model = TaskRouting(["a", "b"], stages=stages, channels=(4, 6), sigma=0.5).eval()
    x = torch.randn(2, 3, 5, 5)
    m0, m1 = (r.masks[1].view(1, -1, 1, 1) for r in model.routers)
    torch.testing.assert_close(model.routed(x, "b"), stages[1](stages[0](x) * m0) * m1)
    # a unit masked out for task b gets no gradient from task b's output
    (grad,) = torch.autograd.grad(model(x, task="b").sum(), stages[1].bias)
    assert bool((grad[m1.flatten() == 0] == 0).all())
    assert bool((grad[m1.flatten() == 1] != 0).all())


# -- learned branching ---------------------------------------------------------------------


def peaked(model: LearnToBranch, layer_parents: list[list[int]], leaves: dict[str, int]) -> None:
    with torch.no_grad():
        for logits, parents in zip(model.layer_logits, layer_parents):
            logits.fill_(-10.0)
            for c, p in enumerate(parents):
                logits[c, p] = 10.0
        for t, leaf in leaves.items():
            model.head_logits[t].fill_(-10.0)
            model.head_logits[t][leaf] = 10.0


def test_export_is_the_argmax_tree_and_matches_eval_mode():
    model = LearnToBranch(["a", "b", "c"], in_features=4, hidden=(5, 5, 5))
    # layer 1: nodes 0 and 1 read node 0, node 2 reads node 2; layer 2: 0 <- 0, 1 <- 1, 2 <- 2
    peaked(model, [[0, 0, 2], [0, 1, 2]], {"a": 0, "b": 1, "c": 2})
    model.eval()
    tree = model.export()
    assert isinstance(tree, BranchedTree)
    x = torch.randn(3, 4)
    out, exported = model(x), tree(x)
    for t in model.tasks:
        torch.testing.assert_close(exported[t], out[t])
    # a and b share layer-0 node 0 and branch at layer 1; c has its own path
    assert tree.users[(0, 0)] == {"a", "b"}
    assert tree.users[(1, 0)] == {"a"} and tree.users[(2, 2)] == {"c"}
    assert sorted(tree.nodes) == ["0_0", "0_2", "1_0", "1_1", "1_2", "2_0", "2_1", "2_2"]
    tree.check_partition()
    shared = {id(p) for p in tree.shared_parameters()}
    assert {id(p) for p in tree.nodes["0_0"].parameters()} <= shared
    own_c = {id(p) for p in tree.task_parameters("c")}
    assert {id(p) for p in tree.nodes["0_2"].parameters()} <= own_c


def test_exported_tree_computes_each_node_once():
    model = LearnToBranch(["a", "b"], in_features=4, hidden=(5, 5))
    peaked(model, [[0, 0]], {"a": 0, "b": 1})
    tree = model.export()
    calls: list[str] = []
    for name, node in tree.nodes.items():
        node.register_forward_hook(lambda *_, name=name: calls.append(name))
    tree(torch.randn(2, 4))
    assert sorted(calls) == ["0_0", "1_0", "1_1"]


def test_training_forward_mixes_parents_by_gumbel_softmax():
    model = LearnToBranch(["a", "b"], in_features=3, hidden=(4, 4), tau=0.5)
    x = torch.randn(2, 3)
    h0 = torch.stack([model.nodes[f"0_{i}"](x) for i in range(2)])
    torch.manual_seed(5)
    out = model(x, task="a")
    torch.manual_seed(5)  # replay the same Gumbel draws by hand
    g1 = nn.functional.gumbel_softmax(model.layer_logits[0], tau=0.5, dim=-1)
    h1 = torch.stack([model.nodes[f"1_{c}"](torch.tensordot(g1[c], h0, 1)) for c in range(2)])
    gh = nn.functional.gumbel_softmax(model.head_logits["a"], tau=0.5, dim=-1)
    torch.testing.assert_close(out, model.heads["a"](torch.tensordot(gh, h1, 1)))


def test_hard_gates_are_one_hot_and_differentiable():
    model = LearnToBranch(["a", "b"], in_features=3, hidden=(4, 4), hard=True)
    gates = model._gates(model.layer_logits[0])
    assert bool(((gates == 0) | (gates == 1)).all()) and bool((gates.sum(-1) == 1).all())
    model(torch.randn(2, 3))["a"].sum().backward()
    assert model.layer_logits[0].grad is not None


def test_your_blocks_need_heads():
    with pytest.raises(InvalidHyperparameterError, match="heads"):
        LearnToBranch(2, blocks=[nn.Linear(3, 3)])
