"""A message-passing encoder for molecules: edge networks, a GRU and a Set2Set readout."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polytask.archs.backbones._registry import register_backbone

__all__ = ["MPNNEncoder", "Set2Set", "mpnn_encoder", "pack_graphs"]


def pack_graphs(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Padded molecules -> one graph of all their atoms, fully connected within a molecule.

    ``inputs``: ``x`` [B, N, F] atom features, ``pos`` [B, N, 3] coordinates, ``bonds``
    [B, N, N] bond codes (0 none, 1 single, 2 double, 3 triple, 4 aromatic), ``mask``
    [B, N] real atoms (padding after them or anywhere). Returns ``x`` [T, F] (float) of the
    T real atoms, ``graph`` [T] their molecule, ``src``/``dst`` [E] every ordered pair of
    distinct atoms of one molecule (PyG's ``Complete`` transform, as Nash-MTL uses) and
    ``edge_attr`` [E, 5]: the one-hot bond type (zeros for an unbonded pair), then the
    distance (PyG's ``Distance(norm=False)``).
    """
    missing = [k for k in ("x", "pos", "bonds", "mask") if k not in inputs]
    if missing:
        raise KeyError(f"molecule inputs need the keys x, pos, bonds, mask; missing {missing}")
    x, pos, bonds, mask = inputs["x"], inputs["pos"], inputs["bonds"], inputs["mask"].bool()
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, N], got shape {tuple(mask.shape)}")
    b, n = mask.shape
    if x.shape[:2] != (b, n) or pos.shape != (b, n, 3) or bonds.shape != (b, n, n):
        raise ValueError(
            f"molecule inputs disagree: mask {tuple(mask.shape)}, x {tuple(x.shape)}, pos "
            f"{tuple(pos.shape)}, bonds {tuple(bonds.shape)}; expected [B, N], [B, N, F], "
            "[B, N, 3], [B, N, N]"
        )
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"molecules {empty} of the batch have no atom (mask all False)")
    node = torch.full((b, n), -1, dtype=torch.long, device=mask.device)
    node[mask] = torch.arange(int(mask.sum()), device=mask.device)
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    pairs = mask[:, :, None] & mask[:, None, :] & ~eye
    mol, i, j = pairs.nonzero(as_tuple=True)
    codes = bonds[mol, i, j].long()
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 4):
        raise ValueError("bond codes must be 0 (none), 1, 2, 3 or 4 (single to aromatic)")
    onehot = F.one_hot(codes, 5)[:, 1:].to(pos.dtype)
    distance = (pos[mol, i] - pos[mol, j]).norm(dim=-1, keepdim=True)
    return {
        "x": x[mask].float(),
        "graph": mask.nonzero(as_tuple=True)[0],
        "src": node[mol, i],
        "dst": node[mol, j],
        "edge_attr": torch.cat([onehot, distance.to(onehot.dtype)], dim=1).float(),
        "num_graphs": torch.tensor(b),
    }


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals, Bengio & Kudlur, "Order Matters: Sequence to sequence for
    sets", ICLR 2016), as PyG's ``Set2Set``: ``steps`` rounds of an LSTM query ``q``,
    attention ``a_i = softmax_i(<h_i, q>)`` over the atoms of each graph, read-out
    ``r = sum_i a_i h_i``; returns ``[q, r]`` of shape [G, 2 * dim]."""

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        self.dim, self.steps = dim, steps
        self.lstm = nn.LSTMCell(2 * dim, dim)

    def forward(self, h: Tensor, graph: Tensor, num_graphs: int) -> Tensor:
        q_star = h.new_zeros(num_graphs, 2 * self.dim)
        state = (h.new_zeros(num_graphs, self.dim), h.new_zeros(num_graphs, self.dim))
        for _ in range(self.steps):
            state = self.lstm(q_star, state)
            q = state[0]
            e = (h * q[graph]).sum(dim=-1)
            # Softmax within each graph, shifted by the graph's maximum for stability.
            e_max = e.new_full((num_graphs,), -torch.inf).scatter_reduce(
                0, graph, e, reduce="amax", include_self=True
            )
            w = torch.exp(e - e_max[graph])
            total = w.new_zeros(num_graphs).index_add(0, graph, w)
            a = w / total[graph]
            r = h.new_zeros(num_graphs, self.dim).index_add(0, graph, a[:, None] * h)
            q_star = torch.cat([q, r], dim=-1)
        return q_star


class MPNNEncoder(nn.Module):
    """Message-passing network with edge networks, a GRU update and a Set2Set readout.

    Gilmer, Schoenholz, Riley, Vinyals & Dahl, "Neural Message Passing for Quantum
    Chemistry", ICML 2017 (edge network message function, GRU update, set2set readout), in
    the compact form of PyG's ``examples/qm9_nn_conv.py`` that Nash-MTL (Navon et al., ICML
    2022, ``experiments/quantum_chemistry/models.py``) and FAMO (Liu et al., NeurIPS 2023)
    use as the shared QM9 encoder::

        h^0 = ReLU(W_0 x)
        m_i = ReLU(W_r h_i + mean_{j != i} h_j A(e_ij) + b),   A(e) = MLP(e) as [dim, dim]
        h   = GRU(m, h)                                         (``steps`` times, shared)
        out = ReLU(W_1 Set2Set(h))                              [B, dim]

    on the complete graph of each molecule with edge features ``e_ij`` = one-hot bond type
    and distance (:func:`pack_graphs`). The edge network ``A`` is ``Linear(edge_features,
    edge_hidden) - ReLU - Linear(edge_hidden, dim * dim)``.

    Args:
        node_features: atom feature width (11, PyG's QM9 features).
        edge_features: 5 (four bond types and the distance).
        dim: hidden width (64).
        edge_hidden: hidden width of the edge network (128).
        steps: message-passing rounds (3).
        set2set_steps: Set2Set rounds (3).

    Input: the dict of padded molecules described in :func:`pack_graphs`.

    Departure from PyG's ``NNConv``: the edge network's matrices ``A(e_ij)`` are computed
    once per forward pass and reused in the ``steps`` rounds (PyG recomputes the same
    values each round), which is the same function at a third of the edge-network cost.
    """

    def __init__(
        self,
        node_features: int = 11,
        edge_features: int = 5,
        dim: int = 64,
        edge_hidden: int = 128,
        steps: int = 3,
        set2set_steps: int = 3,
    ) -> None:
        super().__init__()
        for name, value in (
            ("node_features", node_features),
            ("dim", dim),
            ("edge_hidden", edge_hidden),
            ("steps", steps),
        ):
            if value < 1:
                raise ValueError(f"{name}={value} must be positive")
        if edge_features != 5:
            raise ValueError(
                f"edge_features={edge_features}: pack_graphs gives 5 (4 bond types, distance)"
            )
        self.node_features, self.dim, self.steps = node_features, dim, steps
        self.out_features = dim
        self.lin0 = nn.Linear(node_features, dim)
        self.edge_net = nn.Sequential(
            nn.Linear(edge_features, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim)
        )
        self.root = nn.Linear(dim, dim, bias=False)
        self.conv_bias = nn.Parameter(torch.zeros(dim))
        self.gru = nn.GRUCell(dim, dim)
        self.set2set = Set2Set(dim, set2set_steps)
        self.lin1 = nn.Linear(2 * dim, dim)

    def forward(self, inputs: Mapping[str, Tensor]) -> Tensor:
        g = pack_graphs(inputs)
        if g["x"].shape[1] != self.node_features:
            raise ValueError(
                f"atom features have width {g['x'].shape[1]}, the encoder expects "
                f"{self.node_features}"
            )
        src, dst = g["src"], g["dst"]
        num_atoms, num_graphs = g["x"].shape[0], int(g["num_graphs"])
        weights = self.edge_net(g["edge_attr"]).view(-1, self.dim, self.dim)
        degree = torch.zeros(num_atoms, device=src.device).index_add(
            0, dst, torch.ones_like(dst, dtype=torch.float)
        )
        h = F.relu(self.lin0(g["x"]))
        for _ in range(self.steps):
            messages = torch.bmm(h[src].unsqueeze(1), weights).squeeze(1)
            mean = h.new_zeros(num_atoms, self.dim).index_add(0, dst, messages)
            mean = mean / degree.clamp(min=1).unsqueeze(1)
            m = F.relu(mean + self.root(h) + self.conv_bias)
            h = self.gru(m, h)
        return F.relu(self.lin1(self.set2set(h, g["graph"], num_graphs)))


@register_backbone("mpnn_encoder")
def mpnn_encoder(**kwargs: object) -> MPNNEncoder:
    """The QM9 message-passing encoder (keyword arguments as :class:`MPNNEncoder`)."""
    return MPNNEncoder(**kwargs)  # type: ignore[arg-type]
