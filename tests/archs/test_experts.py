"""Paper checks of the expert architectures (shared-bottom, OMoE, MMoE, CGC, PLE, DSelect-k).

Identities the papers state (MMoE with one expert is shared-bottom; OMoE is MMoE with tied
gates; CGC is one level of PLE), the formulas by hand (PLE eq. 6, DSelect-k's smooth-step
and binary selectors), DSelect-k's exact k-sparse selection after training, and a
differential test against LibMTL 1.1.5 where its architectures coincide with ours.
"""

from __future__ import annotations

import importlib
import importlib.util
import types

import pytest
import torch
from torch import nn

import polytask
from polytask.archs.experts import CGC, PLE, DSelectK, DSelectKGate, MMoE, OMoE, SharedBottom
from polytask.archs.experts.dselect_k import smooth_step
from polytask.errors import InvalidHyperparameterError, PolytaskError

from .._libmtl import register_libmtl

TASKS = ["income", "marital"]


def _x(n: int = 6, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for t in a:
        torch.testing.assert_close(a[t], b[t], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# identities of the MMoE paper


def test_mmoe_with_one_expert_is_shared_bottom():
    torch.manual_seed(0)
    mmoe = MMoE(TASKS, in_features=5, num_experts=1, expert=[7, 4], tower=[3]).double()
    sb = SharedBottom(TASKS, in_features=5, bottom=[7, 4], tower=[3]).double()
    # One expert: softmax over one logit is 1, whatever the gate's weights.
    sb.bottom.load_state_dict(mmoe.experts[0].state_dict())
    sb.towers.load_state_dict(mmoe.towers.state_dict())
    _assert_same(_outputs(mmoe, _x()), _outputs(sb, _x()))


def test_omoe_is_mmoe_with_tied_gates():
    torch.manual_seed(0)
    omoe = OMoE(TASKS, in_features=5, num_experts=4, expert=[6], tower=[3]).double()
    mmoe = MMoE(TASKS, in_features=5, num_experts=4, expert=[6], tower=[3]).double()
    mmoe.experts.load_state_dict(omoe.experts.state_dict())
    mmoe.towers.load_state_dict(omoe.towers.state_dict())
    for t in TASKS:
        mmoe.gates[t].load_state_dict(omoe.gate.state_dict())
    _assert_same(_outputs(omoe, _x()), _outputs(mmoe, _x()))
    # ... and untied gates make a difference (the check above is not vacuous).
    with torch.no_grad():
        mmoe.gates["marital"].linear.bias[0] += 1.0
    assert not torch.allclose(_outputs(mmoe, _x())["marital"], _outputs(omoe, _x())["marital"])
    torch.testing.assert_close(_outputs(mmoe, _x())["income"], _outputs(omoe, _x())["income"])


def test_mmoe_by_hand():
    """Eq. 6-7: y_k = h_k(sum_i softmax(W_gk x)_i f_i(x))."""
    torch.manual_seed(1)
    model = MMoE(TASKS, in_features=5, num_experts=3, expert=[4], tower=[2]).double()
    x = _x()
    out = _outputs(model, x)
    with torch.no_grad():
        for t in TASKS:
            lin = model.gates[t].linear
            g = torch.softmax(x @ lin.weight.T + lin.bias, dim=1)
            mixture = sum(g[:, i : i + 1] * model.experts[i](x) for i in range(3))
            torch.testing.assert_close(out[t], model.towers[t](mixture))


def test_mmoe_encode_decode_needs_a_matching_encode():
    model = MMoE(TASKS, in_features=5, num_experts=2, expert=[3], tower=[2])
    with pytest.raises(PolytaskError, match="encode"):
        model.decode(torch.zeros(4, 2, 3))
    z = model.encode(torch.zeros(4, 5))
    assert z.shape == (4, 2, 3)
    with pytest.raises(PolytaskError, match="4"):
        model.decode(torch.zeros(3, 2, 3))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="in_features=5"):
        MMoE(TASKS, in_features=5, num_experts=2, expert=[3], tower=[2])(torch.zeros(2, 4))
    with pytest.raises(InvalidHyperparameterError, match="num_experts=0"):
        MMoE(TASKS, in_features=5, num_experts=0, expert=[3], tower=[2])
    with pytest.raises(InvalidHyperparameterError, match="expert_features"):
        MMoE(TASKS, in_features=5, num_experts=2, expert=lambda n: nn.Linear(n, 3), tower=[2])
    with pytest.raises(InvalidHyperparameterError, match="expert_features"):
        PLE(TASKS, 5, 1, 1, expert=lambda n: nn.Linear(n, 3), tower=lambda t, n: nn.Linear(3, 1))
    with pytest.raises(InvalidHyperparameterError, match="no expert"):
        CGC(TASKS, 5, num_shared=0, num_specific={"income": 1, "marital": 0}, expert=[3], tower=[])
    with pytest.raises(InvalidHyperparameterError, match="k=3"):
        DSelectK(TASKS, 5, num_experts=2, k=3, expert=[3], tower=[2])
    with pytest.raises(TypeError, match="factory"):
        SharedBottom(TASKS, 5, bottom=lambda n: "not a module", tower=[2])


# ---------------------------------------------------------------------------------------
# CGC and PLE


def test_cgc_is_one_level_of_ple():
    torch.manual_seed(0)
    kw = dict(in_features=5, num_shared=2, num_specific={"income": 1, "marital": 3})
    cgc = CGC(TASKS, **kw, expert=[4], tower=[3]).double()
    ple = PLE(TASKS, **kw, expert=[4], tower=[3], num_levels=1).double()
    assert ple.levels[0].shared_gate is None
    ple.load_state_dict(cgc.state_dict())  # strict: the same modules, nothing more
    _assert_same(_outputs(cgc, _x()), _outputs(ple, _x()))


def test_cgc_by_hand():
    """Eq. 2-5: g^k = softmax(W^k x) [E_k(x); E_s(x)], y_k = t_k(g^k(x))."""
    torch.manual_seed(2)
    model = CGC(TASKS, 5, num_shared=2, num_specific=2, expert=[4], tower=[2]).double()
    x = _x()
    out = _outputs(model, x)
    layer = model.levels[0]
    with torch.no_grad():
        for t in TASKS:
            experts = [e(x) for e in layer.task_experts[t]] + [e(x) for e in layer.shared_experts]
            lin = layer.task_gates[t].linear
            g = torch.softmax(x @ lin.weight.T + lin.bias, dim=1)
            mixture = sum(g[:, i : i + 1] * experts[i] for i in range(4))
            torch.testing.assert_close(out[t], model.towers[t](mixture))


def test_ple_two_levels_by_hand():
    """Eq. 6: level-2 task gates read g^{k,1}, the level-2 shared experts read g^{s,1}, the
    level-1 shared gate mixes every level-1 expert, the top level has no shared gate."""
    torch.manual_seed(3)
    tasks = ["a", "b", "c"]
    model = PLE(tasks, 5, num_shared=2, num_specific=1, expert=[4], tower=[2]).double()
    x = _x()
    out = _outputs(model, x)

    def gate(module, inp, experts):
        w = torch.softmax(inp @ module.linear.weight.T + module.linear.bias, dim=1)
        return sum(w[:, i : i + 1] * e for i, e in enumerate(experts))

    low, top = model.levels
    assert top.shared_gate is None
    with torch.no_grad():
        own1 = {t: [e(x) for e in low.task_experts[t]] for t in tasks}
        shared1 = [e(x) for e in low.shared_experts]
        g1 = {t: gate(low.task_gates[t], x, own1[t] + shared1) for t in tasks}
        everything = [e for t in tasks for e in own1[t]] + shared1
        gs1 = gate(low.shared_gate, x, everything)
        shared2 = [e(gs1) for e in top.shared_experts]
        for t in tasks:
            own2 = [e(g1[t]) for e in top.task_experts[t]]
            g2 = gate(top.task_gates[t], g1[t], own2 + shared2)
            torch.testing.assert_close(out[t], model.towers[t](g2))


def test_ple_lower_task_experts_are_shared():
    """Task k's lower-level experts feed the shared gate, so every task reaches them."""
    torch.manual_seed(0)
    tanh = lambda n: nn.Sequential(nn.Linear(n, 4), nn.Tanh())  # noqa: E731  (no dead units)
    model = PLE(TASKS, 5, 1, 1, expert=tanh, tower=[], num_levels=3, expert_features=4)
    own = {id(p) for p in model.task_parameters("income")}
    low = list(model.levels[0].task_experts["income"].parameters())
    assert not any(id(p) in own for p in low)
    out = model(_x().float())
    grads = torch.autograd.grad(out["marital"].sum(), low)
    assert all(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------------------------------
# DSelect-k


def test_smooth_step_by_hand():
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    # -2 t^3 / 8 + 3 t / 4 + 1/2 at t = -0.5, 0, 0.5: 0.15625, 0.5, 0.84375.
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(smooth_step(t, gamma), expected)
    # C^1: the derivative vanishes at the edges of the cubic region.
    edge = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(edge, gamma).sum(), edge)
    assert grad.abs().max() < 1e-12 or torch.allclose(grad, torch.zeros(2, dtype=torch.float64))


def test_selectors_are_binary_codes():
    """A saturated selector is one-hot at the expert whose index its bits spell (MSB first,
    as np.binary_repr in the official code); unsaturated, it is a product distribution."""
    gate = DSelectKGate(num_experts=8, k=2, gamma=1.0, conditioning="task").double()
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[1.0, -1.0, 1.0], [-3.0, 2.0, 0.0]]))
    sel = gate.selectors(gate.z)
    torch.testing.assert_close(sel[0], torch.eye(8, dtype=torch.float64)[5])  # 101 = 5
    # Bits (0, 1, 1/2): experts 010 = 2 and 011 = 3, half each.
    torch.testing.assert_close(sel[1], 0.5 * (torch.eye(8)[2] + torch.eye(8)[3]).double())
    # Any z gives a point of the simplex when n is a power of 2.
    z = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(gate.selectors(z).sum(-1), torch.ones(5, 2, dtype=torch.float64))


def test_dselect_k_regulariser_by_hand():
    gate = DSelectKGate(num_experts=3, k=1, gamma=1.0, conditioning="task").double()
    with torch.no_grad():
        gate.z.copy_(torch.tensor([[0.0, 1.0]]))  # bits (1/2, 1): experts 01 = 1 and 11 (absent)
    _, sel = gate(None)
    torch.testing.assert_close(sel, torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.float64))
    entropy = -(0.5 * torch.log(torch.tensor(0.5 + 1e-6, dtype=torch.float64)))
    # n = 3 is not a power of 2: the reachability term 1 / sum(r) = 2 is added.
    torch.testing.assert_close(gate.regularizer(sel, 0.1), 0.1 * entropy + 2.0)


def test_dselect_k_aux_loss_follows_training_forwards():
    model = DSelectK(TASKS, 5, num_experts=4, k=2, expert=[3], tower=[2], entropy_reg=0.5)
    model.train()
    out = model(_x().float(), task="income")
    aux = model.aux_loss()
    _, sel = model.gates["income"](_x().float())
    torch.testing.assert_close(aux, -0.5 * (sel * torch.log(sel + 1e-6)).sum())
    # Its own graph: backward on the task loss first, then on aux_loss, works.
    out.sum().backward()
    aux.backward()
    model.eval()
    model(_x().float())
    assert model.aux_loss() is None


def _fixed_experts(n: int, batch: int, seed: int) -> torch.Tensor:
    """Inputs X [batch, n] with orthogonal columns (expert e will output column e)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, generator=g, dtype=torch.float64))
    return q * batch**0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_dselect_k_selects_exactly_k_experts(seed):
    """The paper's claim: once the gates converge, every smooth-step is exactly 0 or 1 and each
    task's expert weights have exactly k non-zeros, on the k experts its target needs."""
    n, k, batch = 8, 2, 32
    x = _fixed_experts(n, batch, seed)
    made = iter(range(n))

    def expert(in_features):
        layer = nn.Linear(in_features, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(n)[next(made)])  # expert e outputs x[:, e]
        layer.weight.requires_grad_(False)
        return layer

    torch.manual_seed(seed)
    model = DSelectK(
        ["a", "b"],
        n,
        n,
        k,
        expert=expert,
        tower=lambda t, d: nn.Identity(),
        expert_features=1,
        conditioning="task",
        entropy_reg=1e-3,
    ).double()
    best = {"a": (5, 2), "b": (1, 6)}
    targets = {t: 0.6 * x[:, [i]] + 0.4 * x[:, [j]] for t, (i, j) in best.items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    model.train()
    for _ in range(300):
        out = model(x)
        loss = sum((out[t] - targets[t]).pow(2).mean() for t in best) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for t, chosen in best.items():
            gate = model.gates[t]
            s = smooth_step(gate.z, gate.gamma)
            assert bool(((s == 0) | (s == 1)).all()), f"{t}: smooth-steps not saturated: {s}"
            weights, selectors = gate(None)
            assert sorted(weights.nonzero().flatten().tolist()) == sorted(chosen), weights
            assert int((weights != 0).sum()) == k
            assert bool(((selectors == 0) | (selectors == 1)).all())
            torch.testing.assert_close(
                weights[list(chosen)], torch.tensor([0.6, 0.4]).double(), atol=1e-3, rtol=0
            )


# ---------------------------------------------------------------------------------------
# LibMTL 1.1.5


def _libmtl_architecture() -> types.ModuleType:
    """``LibMTL.architecture`` without ``LibMTL/__init__.py`` (which needs torchvision)."""
    register_libmtl()
    return importlib.import_module("LibMTL.architecture")


class _Expert(nn.Module):
    """LibMTL builds experts from a no-argument class: a 5 -> 4 ReLU layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def _libmtl(name: str, ours: nn.Module, **kwargs):
    arch = getattr(_libmtl_architecture(), name)
    decoders = nn.ModuleDict({t: ours.towers[t] for t in TASKS})
    return arch(TASKS, _Expert, decoders, False, False, "cpu", img_size=[5], **kwargs).double()


def _copy_expert(dst: _Expert, src: nn.Module) -> None:
    dst.net.load_state_dict(src.state_dict())


def test_mmoe_matches_libmtl():
    torch.manual_seed(0)
    ours = MMoE(TASKS, 5, num_experts=3, expert=[4], tower=[3]).double()
    ref = _libmtl("MMoE", ours, num_experts=[3])
    for dst, src in zip(ref.experts_shared, ours.experts, strict=True):
        _copy_expert(dst, src)
    for t in TASKS:
        ref.gate_specific[t][0].load_state_dict(ours.gates[t].linear.state_dict())
    _assert_same(_outputs(ours, _x()), _outputs(ref, _x()))


def test_cgc_matches_libmtl():
    """LibMTL orders the gate's experts [shared, own]; the paper's eq. 4 (and ours) [own,
    shared]: the gate's rows are permuted accordingly."""
    torch.manual_seed(0)
    ours = CGC(
        TASKS, 5, num_shared=2, num_specific={"income": 1, "marital": 3}, expert=[4], tower=[3]
    ).double()
    ref = _libmtl("CGC", ours, num_experts=[2, 1, 3])
    layer = ours.levels[0]
    for dst, src in zip(ref.experts_shared, layer.shared_experts, strict=True):
        _copy_expert(dst, src)
    for t in TASKS:
        for dst, src in zip(ref.experts_specific[t], layer.task_experts[t], strict=True):
            _copy_expert(dst, src)
        m = len(layer.task_experts[t])
        lin = layer.task_gates[t].linear
        order = list(range(m, m + 2)) + list(range(m))  # shared rows first
        with torch.no_grad():
            ref.gate_specific[t][0].weight.copy_(lin.weight[order])
            ref.gate_specific[t][0].bias.copy_(lin.bias[order])
    _assert_same(_outputs(ours, _x()), _outputs(ref, _x()))


def test_dselect_k_matches_libmtl():
    """Per-example DSelect-k gates with gamma = 1 (LibMTL's smooth-step ignores its
    ``kgamma`` argument, which only sets the initialisation, so other gammas differ).

    LibMTL (like the official code) builds the binary codes with
    ``np.array([list(np.binary_repr(e, width=m))]).astype(bool)``: under NumPy >= 2 a string
    casts to bool by truthiness, so "0" is True and every code is all ones (every expert
    gets the same weight). The paper's codes are the binary digits of e (what that line
    gave under NumPy 1.x, and what ours are: see test_selectors_are_binary_codes), so the
    reference gets them before the comparison."""
    torch.manual_seed(0)
    ours = DSelectK(TASKS, 5, num_experts=6, k=3, expert=[4], tower=[3], gamma=1.0).double()
    ref = _libmtl("DSelect_k", ours, num_experts=[6], num_nonzeros=3, kgamma=1.0)
    digits = [[int(c) for c in format(e, "03b")] for e in range(6)]
    ref._binary_codes = torch.tensor(digits, dtype=torch.bool).unsqueeze(0)
    for dst, src in zip(ref.experts_shared, ours.experts, strict=True):
        _copy_expert(dst, src)
    for t in TASKS:
        # Saturate some bits so the comparison covers the flat parts of the smooth-step too.
        with torch.no_grad():
            ours.gates[t].z_logits.weight.mul_(200.0)
        ref._z_logits[t].load_state_dict(ours.gates[t].z_logits.state_dict())
        ref._w_logits[t].load_state_dict(ours.gates[t].w_logits.state_dict())
    _assert_same(_outputs(ours, _x()), _outputs(ref, _x()))


def test_registered_names():
    for name in ("shared_bottom", "omoe", "mmoe", "cgc", "ple", "dselect_k"):
        assert name in polytask.archs.available()
