"""The QM9 SMILES reader on hand-worked molecules and on what it must refuse."""

from __future__ import annotations

import pytest

from polytask.data._smiles import parse_smiles


def test_ethanol():
    mol = parse_smiles("CCO")
    assert mol.elements == ("C", "C", "O")
    assert mol.hydrogens == (3, 2, 1)
    assert mol.charges == (0, 0, 0)
    assert mol.bonds == ((0, 1, 1), (1, 2, 1))


def test_kekule_benzene_closes_its_ring_with_a_single_bond():
    mol = parse_smiles("C1=CC=CC=C1")
    assert mol.hydrogens == (1,) * 6
    assert sorted(mol.bonds) == [(0, 1, 2), (0, 5, 1), (1, 2, 1), (2, 3, 2), (3, 4, 1), (4, 5, 2)]


def test_bracket_atoms_carry_hydrogens_and_charges():
    mol = parse_smiles("[NH3+]CCC([O-])=O")
    assert mol.elements == ("N", "C", "C", "C", "O", "O")
    assert mol.charges == (1, 0, 0, 0, -1, 0)
    assert mol.hydrogens == (3, 2, 2, 0, 0, 0)
    assert sorted(mol.bonds) == [(0, 1, 1), (1, 2, 1), (2, 3, 1), (3, 4, 1), (3, 5, 2)]
    assert parse_smiles("[CH-]=O").hydrogens == (1, 0)
    assert parse_smiles("[CH-]=O").charges == (-1, 0)
    assert parse_smiles("[O--]").charges == (-2,)
    assert parse_smiles("[N+2]").charges == (2,)


def test_triple_bonds_and_valence_five_nitrogen():
    assert parse_smiles("C#N").bonds == ((0, 1, 3),)
    assert parse_smiles("C#N").hydrogens == (1, 0)
    # N with bond orders 1 + 2 + 2 = 5 takes its higher normal valence: no hydrogen
    assert parse_smiles("CN(=O)=O").hydrogens == (3, 0, 0, 0)


def test_ring_bond_order_on_either_digit_and_two_rings_on_one_atom():
    assert (0, 2, 2) in parse_smiles("C=1CC1").bonds
    assert (0, 2, 2) in parse_smiles("C1CC=1").bonds
    mol = parse_smiles("C12CC1C2")
    assert sorted(mol.bonds) == [(0, 1, 1), (0, 2, 1), (0, 3, 1), (1, 2, 1), (2, 3, 1)]
    assert mol.hydrogens == (1, 2, 1, 2)  # atoms 0 and 2 have three bonds each
    assert sorted(parse_smiles("C%10CC%10").bonds) == [(0, 1, 1), (0, 2, 1), (1, 2, 1)]


def test_branches_and_dots():
    mol = parse_smiles("CC(C)(C)O.F")
    assert sorted(mol.bonds) == [(0, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1)]
    assert mol.hydrogens == (3, 0, 3, 3, 1, 1)


@pytest.mark.parametrize(
    "smiles, message",
    [
        ("c1ccccc1", "aromatic"),
        ("C/C=C/C", "stereochemistry"),
        ("CCl", "Cl is not in QM9"),
        ("C(C", "unclosed '\\('"),
        ("C1CC", "ring bond 1 is never closed"),
        ("=C", "before the first atom"),
        ("C==C", "two bond symbols"),
        ("C)C", "unmatched"),
        ("[13CH4]", "not one of"),
        ("[CH4@]", "does not know"),
        ("C=1CC#1", "two different orders"),
        ("C11", "second bond"),
        ("", "non-empty"),
    ],
)
def test_refuses_what_it_cannot_read(smiles, message):
    with pytest.raises(ValueError, match=message):
        parse_smiles(smiles)
