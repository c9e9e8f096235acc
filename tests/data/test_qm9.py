"""QM9 from qm9pack: targets and units, graphs, the fixed split and a smoke run."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from polytask.data import qm9
from polytask.data._splits import disjoint_splits
from polytask.errors import DataFormatError

if importlib.util.find_spec("qm9pack") is None:
    pytest.skip("qm9pack (which ships the data) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def small():
    return qm9.load(subset=300)


def test_atom_references_are_pygs_in_ev():
    # PyG's torch_geometric/datasets/qm9.py ``atomrefs`` for targets 7-10 (eV), which it
    # subtracts to get the atomization energies Nash-MTL trains on.
    pyg = {
        "u0": (-13.61312172, -1029.86312267, -1485.30251237, -2042.61123593, -2713.48485589),
        "u": (-13.5745904, -1029.82456413, -1485.26398105, -2042.5727046, -2713.44632457),
        "h": (-13.54887564, -1029.79887659, -1485.2382935, -2042.54701705, -2713.42063702),
        "g": (-13.90303183, -1030.25891228, -1485.71166277, -2043.01812778, -2713.88796536),
    }
    for task, values in pyg.items():
        ours = np.array(qm9.ATOMREF[task]) * qm9.HARTREE_TO_MEV / 1000
        np.testing.assert_allclose(ours, values, atol=2e-5)


def test_targets_of_methane_by_hand():
    # qm9pack's first row (QM9 index 1, CH4): mu 0 D, alpha 13.21 a0^3, HOMO -0.3877 Ha,
    # LUMO 0.1171 Ha, R2 35.3641 a0^2, ZPVE 0.044749 Ha, U0 -40.47893 Ha, Cv 6.469.
    y = dict(zip(qm9.TASKS, qm9.targets()[0]))
    mev = 27211.386246
    assert y["mu"] == 0.0 and y["alpha"] == pytest.approx(13.21)
    assert y["homo"] == pytest.approx(-0.3877 * mev)
    assert y["lumo"] == pytest.approx(0.1171 * mev)
    assert y["r2"] == pytest.approx(35.3641) and y["cv"] == pytest.approx(6.469)
    assert y["zpve"] == pytest.approx(0.044749 * mev)
    atoms = 4 * -0.500273 + -37.846772  # four H and one C
    assert y["u0"] == pytest.approx((-40.47893 - atoms) * mev)
    assert y["g"] == pytest.approx((-40.498597 - (4 * -0.510927 - 37.861317)) * mev)


def test_fixed_split_is_disjoint_complete_and_leaves_out_the_mismatched_molecules():
    splits = qm9._splits()
    sizes = {s: len(r) for s, r in splits.items()}
    assert sizes == {"train": 110_825, "val": 10_000, "test": 10_000}
    rows = np.concatenate(list(splits.values()))
    assert len(np.unique(rows)) == 130_825
    index = qm9._table()["Index"]
    assert not set(qm9.EXCLUDED) & set(index.tolist())
    again = disjoint_splits(130_825, sizes, qm9.SPLIT_SEED)
    for split in splits:
        np.testing.assert_array_equal(again[split], splits[split])


def test_targets_are_standardised_with_training_statistics(small):
    mean, std = qm9.statistics()
    train = qm9.targets()[qm9._splits()["train"]]
    np.testing.assert_allclose(((train - mean) / std).mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(((train - mean) / std).std(axis=0), 1, atol=1e-9)
    rows = {int(i): k for k, i in enumerate(qm9._table()["Index"])}
    d = small["val"]
    for k in (0, 5):
        expected = (qm9.targets()[rows[int(d.source[k])]] - mean) / std
        got = np.array([float(d.targets[t][k]) for t in qm9.TASKS])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_metrics_report_mae_in_the_original_units():
    _, std = qm9.statistics()
    tasks = qm9.tasks()
    assert tasks.names == list(qm9.TASKS)
    metric = tasks.tasks[2].make_metrics()[0]  # homo, meV
    metric.update(torch.tensor([[1.0], [-1.0]]), torch.tensor([0.0, 0.0]))
    assert metric.compute()["mae"] == pytest.approx(std[2])


def test_items_shapes_dtypes_and_padding(small):
    assert {s: len(d) for s, d in small.items()} == {"train": 300, "val": 28, "test": 28}
    molecule, targets = small["train"][0]
    assert set(molecule) == {"x", "pos", "bonds", "mask"}
    assert molecule["x"].shape == (29, 11) and molecule["x"].dtype == torch.uint8
    assert molecule["pos"].shape == (29, 3) and molecule["pos"].dtype == torch.float32
    assert molecule["bonds"].shape == (29, 29) and molecule["bonds"].dtype == torch.uint8
    assert set(targets) == set(qm9.TASKS) and targets["mu"].dtype == torch.float32
    d = small["train"].inputs
    n = d["mask"].sum(1)
    assert torch.equal(d["mask"], torch.arange(29)[None] < n[:, None])  # atoms first
    pad = ~d["mask"]
    assert not d["x"][pad].any() and not d["pos"][pad].any() and not d["bonds"][pad].any()
    assert torch.equal(d["bonds"], d["bonds"].transpose(1, 2))
    is_h = d["x"][..., 0] == 1
    assert torch.equal(d["x"][..., :5].sum(-1), d["mask"].to(torch.uint8))  # one type each
    assert torch.equal(
        (d["bonds"] > 0).sum(-1)[is_h], torch.ones(int(is_h.sum()), dtype=torch.long)
    )
    # the number-of-hydrogens feature counts the bonded hydrogens
    h_neighbours = ((d["bonds"] > 0) & is_h[:, None, :]).sum(-1)
    assert torch.equal(d["x"][..., 10].long(), h_neighbours)


def test_featurize_small_molecules_by_hand():
    water = qm9.featurize("O", ["O", "H", "H"], np.array([[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]]))
    assert water["x"][0].tolist() == [0, 0, 0, 1, 0, 8, 0, 0, 0, 1, 2]  # O, sp3, two H
    assert water["x"][1].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert water["bonds"].tolist() == [[0, 1, 1], [1, 0, 0], [1, 0, 0]]
    pos = np.array([[0, 0, 0], [1.2, 0, 0], [-0.6, 0.9, 0], [-0.6, -0.9, 0]])
    formaldehyde = qm9.featurize("C=O", ["C", "O", "H", "H"], pos)
    assert formaldehyde["x"][0].tolist() == [0, 1, 0, 0, 0, 6, 0, 0, 1, 0, 2]  # C, sp2
    assert formaldehyde["bonds"][0, 1] == 2
    hcn = qm9.featurize("C#N", ["C", "N", "H"], np.array([[0, 0, 0], [1.15, 0, 0], [-1.07, 0, 0]]))
    assert hcn["x"][:2, 7].tolist() == [1, 1]  # both sp
    co2 = qm9.featurize(
        "O=C=O", ["O", "C", "O"], np.array([[-1.16, 0, 0], [0, 0, 0], [1.16, 0, 0]])
    )
    assert co2["x"][:, 7:10].tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0]]


def test_featurize_refuses_a_smiles_that_does_not_match_the_geometry():
    with pytest.raises(DataFormatError, match="heavy atoms"):
        qm9.featurize("CO", ["O", "C"], np.zeros((2, 3)))
    # C#CC#C with its hydrogens next to the middle carbons instead of the ends
    pos = np.array([[0, 0, 0], [1.2, 0, 0], [2.6, 0, 0], [3.8, 0, 0], [1.2, 1.0, 0], [2.6, 1.0, 0]])
    with pytest.raises(DataFormatError, match="hydrogens"):
        qm9.featurize("C#CC#C", ["C", "C", "C", "C", "H", "H"], pos)


def test_load_is_deterministic_and_checks_its_arguments(small):
    again = qm9.load(subset=300)
    for split in small:
        np.testing.assert_array_equal(again[split].source, small[split].source)
        for key in small[split].inputs:
            assert torch.equal(again[split].inputs[key], small[split].inputs[key])
    with pytest.raises(ValueError, match="fixed split"):
        qm9.load(seed=1, subset=10)
    with pytest.raises(ValueError, match="drop --root"):
        qm9.load(root="/tmp", subset=10)
    with pytest.raises(ValueError, match="unknown qm9 option"):
        qm9.load(subset=10, targets=3)


def test_model_gives_one_output_per_task(small):
    net = qm9.model("hard_sharing", qm9.TASKS)
    batch = {k: v[:4] for k, v in small["test"].inputs.items()}
    out = net(batch)
    assert set(out) == set(qm9.TASKS) and out["mu"].shape == (4, 1)


def test_smoke_run():
    from polytask.train.runner import run

    record = run(
        "qm9",
        method="ew",
        seed=0,
        overrides={"epochs": 1, "batch_size": 16},
        data_options={"subset": 48},
    )
    assert set(record["test"]) == {f"{t}/mae" for t in qm9.TASKS}
    assert all(np.isfinite(v) and v >= 0 for v in record["test"].values())


@pytest.mark.slow
def test_every_molecule_but_the_excluded_ones_matches_its_geometry():
    table = qm9._table()
    for row in range(len(table["Index"])):
        qm9._graph(row)  # raises DataFormatError on a mismatch
    import pandas as pd

    excluded = []
    for part in (1, 2, 3):
        frame = pd.read_csv(
            qm9._csv_dir() / f"qm9_part{part}.csv",
            usecols=["Index", "SMILES", "Elements", "XYZ_Ang"],
        )
        frame = frame[frame["Index"].isin(qm9.EXCLUDED)]
        for _, r in frame.iterrows():
            elements = [e.strip(" '") for e in r["Elements"].strip("[]").split(",")]
            text = r["XYZ_Ang"].replace("[", "").replace("]", "")
            pos = np.array(text.split(","), dtype=float).reshape(-1, 3)
            with pytest.raises(DataFormatError):
                qm9.featurize(r["SMILES"], elements, pos)
            excluded.append(int(r["Index"]))
    assert sorted(excluded) == sorted(qm9.EXCLUDED)
