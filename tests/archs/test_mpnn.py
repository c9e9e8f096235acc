"""The QM9 message-passing encoder: graph packing, a loop reference, invariances."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from polytask.archs.backbones.mpnn import MPNNEncoder, Set2Set, pack_graphs


def _batch() -> dict[str, torch.Tensor]:
    """Molecule 0: two atoms 1.5 apart, single bond; molecule 1: three atoms at (0,0,0),
    (3,0,0), (0,4,0), a double bond between the first two. Padded to N = 3."""
    x = torch.zeros(2, 3, 11)
    x[0, :2, 1] = 1
    x[1, :, 3] = 1
    x[:, :, 5] = torch.tensor([[6, 6, 0], [8, 8, 8]])
    pos = torch.zeros(2, 3, 3)
    pos[0, 1] = torch.tensor([0.0, 0.0, 1.5])
    pos[1, 1] = torch.tensor([3.0, 0.0, 0.0])
    pos[1, 2] = torch.tensor([0.0, 4.0, 0.0])
    bonds = torch.zeros(2, 3, 3, dtype=torch.uint8)
    bonds[0, 0, 1] = bonds[0, 1, 0] = 1
    bonds[1, 0, 1] = bonds[1, 1, 0] = 2
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return {"x": x, "pos": pos, "bonds": bonds, "mask": mask}


def test_pack_graphs_builds_complete_graphs_with_bond_and_distance_features():
    g = pack_graphs(_batch())
    assert g["x"].shape == (5, 11) and g["graph"].tolist() == [0, 0, 1, 1, 1]
    edges = {(int(s), int(d)): e.tolist() for s, d, e in zip(g["src"], g["dst"], g["edge_attr"])}
    assert len(edges) == 2 + 6  # ordered pairs of distinct atoms, within each molecule
    assert edges[(0, 1)] == edges[(1, 0)] == [1.0, 0.0, 0.0, 0.0, 1.5]
    assert edges[(2, 3)] == [0.0, 1.0, 0.0, 0.0, 3.0]
    assert edges[(3, 4)] == [0.0, 0.0, 0.0, 0.0, 5.0]
    assert edges[(2, 4)] == [0.0, 0.0, 0.0, 0.0, 4.0]


def test_pack_graphs_rejects_bad_batches():
    batch = _batch()
    with pytest.raises(KeyError, match="pos"):
        pack_graphs({k: v for k, v in batch.items() if k != "pos"})
    empty = dict(batch, mask=torch.tensor([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="no atom"):
        pack_graphs(empty)
    bad = dict(batch, bonds=batch["bonds"].clone())
    bad["bonds"][1, 0, 2] = 7
    with pytest.raises(ValueError, match="bond codes"):
        pack_graphs(bad)
    with pytest.raises(ValueError, match="disagree"):
        pack_graphs(dict(batch, pos=torch.zeros(2, 3, 2)))


def _reference(net: MPNNEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder written molecule by molecule with explicit sums over neighbours."""
    outputs = []
    for b in range(batch["mask"].shape[0]):
        atoms = batch["mask"][b].nonzero().flatten().tolist()
        x = batch["x"][b, atoms].float()
        h = F.relu(net.lin0(x))
        n = len(atoms)
        matrices = {}
        for i in range(n):
            for j in range(n):
                if i != j:
                    code = int(batch["bonds"][b, atoms[i], atoms[j]])
                    bond = [1.0 if code == k else 0.0 for k in (1, 2, 3, 4)]
                    dist = float((batch["pos"][b, atoms[i]] - batch["pos"][b, atoms[j]]).norm())
                    e = torch.tensor([*bond, dist])
                    matrices[i, j] = net.edge_net(e).view(net.dim, net.dim)
        for _ in range(net.steps):
            m = []
            for i in range(n):
                msgs = [h[j] @ matrices[j, i] for j in range(n) if j != i]
                mean = torch.stack(msgs).mean(0) if msgs else torch.zeros(net.dim)
                m.append(F.relu(mean + net.root(h[i]) + net.conv_bias))
            h = net.gru(torch.stack(m), h)
        q_star = torch.zeros(1, 2 * net.dim)
        state = (torch.zeros(1, net.dim), torch.zeros(1, net.dim))
        for _ in range(net.set2set.steps):
            state = net.set2set.lstm(q_star, state)
            q = state[0][0]
            a = torch.softmax(h @ q, dim=0)
            q_star = torch.cat([q, (a[:, None] * h).sum(0)])[None]
        outputs.append(F.relu(net.lin1(q_star[0])))
    return torch.stack(outputs)


def test_encoder_matches_a_molecule_by_molecule_reference():
    torch.manual_seed(0)
    net = MPNNEncoder(dim=8, edge_hidden=16)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(net(batch), _reference(net, batch), atol=1e-5, rtol=1e-5)


def test_encoder_is_invariant_to_atom_order_and_padding_position():
    torch.manual_seed(1)
    net = MPNNEncoder(dim=8, edge_hidden=16)
    batch = _batch()
    order = torch.tensor([2, 0, 1])  # molecule 1's atoms reordered; molecule 0's padding moved
    moved = {
        "x": batch["x"][:, order],
        "pos": batch["pos"][:, order],
        "bonds": batch["bonds"][:, order][:, :, order],
        "mask": batch["mask"][:, order],
    }
    with torch.no_grad():
        torch.testing.assert_close(net(moved), net(batch), atol=1e-5, rtol=1e-5)


def test_a_molecule_does_not_see_the_rest_of_its_batch():
    torch.manual_seed(2)
    net = MPNNEncoder(dim=8, edge_hidden=16)
    batch = _batch()
    alone = {k: v[1:] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(net(alone)[0], net(batch)[1], atol=1e-6, rtol=1e-6)


def test_set2set_reads_out_the_only_atom_with_weight_one():
    torch.manual_seed(3)
    readout = Set2Set(4, steps=2)
    h = torch.randn(3, 4)
    out = readout(h, torch.tensor([0, 1, 2]), 3)
    torch.testing.assert_close(out[:, 4:], h)


def test_paper_sizes_and_gradients():
    net = MPNNEncoder()
    assert net.out_features == 64
    assert net.edge_net[-1].out_features == 64 * 64  # the edge network gives a 64x64 matrix
    out = net(_batch())
    assert out.shape == (2, 64)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="edge_features"):
        MPNNEncoder(edge_features=4)
