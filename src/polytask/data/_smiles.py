"""A SMILES reader for the chemistry of QM9: Kekulé structures of H, C, N, O and F.

SMILES: Weininger, "SMILES, a chemical language and information system. 1. Introduction to
methodology and encoding rules", J. Chem. Inf. Comput. Sci. 28, 1988; the grammar followed
here is OpenSMILES's (http://opensmiles.org). QM9's SMILES (Ramakrishnan, Dral, Rupp & von
Lilienfeld, Scientific Data 1, 2014) use only the organic-subset atoms ``C N O F``, bracket
atoms with hydrogens and a charge (``[NH3+]``, ``[O-]``, ``[CH-]``), the bonds ``=`` and
``#`` (single bonds implicit), branches and ring-closure digits, in Kekulé form (no aromatic
lower-case atoms, no stereochemistry). This reader accepts that subset plus explicit ``-``
bonds, ``%nn`` ring closures, ``.`` and B, and raises a ``ValueError`` naming the SMILES and
the position for anything else (aromatic atoms, stereo marks, isotopes, other elements),
rather than guessing.

Implicit hydrogens of organic-subset atoms follow OpenSMILES: the smallest normal valence
(B 3, C 4, N 3 or 5, O 2, F 1) at least the sum of the bond orders, minus that sum.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ELEMENTS", "Molecule", "parse_smiles"]

#: Atomic numbers of the elements this reader knows.
ELEMENTS = {"H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9}
_VALENCES = {"B": (3,), "C": (4,), "N": (3, 5), "O": (2,), "F": (1,)}
_BOND_ORDERS = {"-": 1, "=": 2, "#": 3}


@dataclass(frozen=True)
class Molecule:
    """The heavy-atom graph of a SMILES string, atoms in the order they are written.

    Attributes:
        elements: element symbol of each atom.
        charges: formal charge of each atom.
        hydrogens: hydrogens attached to each atom (implicit or written in brackets).
        bonds: ``(i, j, order)`` with ``i < j`` and order 1, 2 or 3, in the order written.
    """

    elements: tuple[str, ...]
    charges: tuple[int, ...]
    hydrogens: tuple[int, ...]
    bonds: tuple[tuple[int, int, int], ...]


def _error(smiles: str, pos: int, what: str) -> ValueError:
    return ValueError(f"cannot read SMILES {smiles!r} at position {pos}: {what}")


def _bracket(smiles: str, start: int) -> tuple[str, int, int, int]:
    """``[Sym Hn charge]`` at ``start``: (symbol, hydrogens, charge, position after ``]``)."""
    end = smiles.find("]", start)
    if end < 0:
        raise _error(smiles, start, "an unclosed '['")
    body, i = smiles[start + 1 : end], 0
    symbol = body[:1]
    if symbol not in ELEMENTS or symbol == "H":
        raise _error(smiles, start, f"bracket atom [{body}] is not one of B, C, N, O, F")
    i = 1
    hydrogens = 0
    if body[i : i + 1] == "H":
        i += 1
        digits = ""
        while body[i : i + 1].isdigit():
            digits += body[i]
            i += 1
        hydrogens = int(digits) if digits else 1
    charge = 0
    if body[i : i + 1] in ("+", "-"):
        sign = 1 if body[i] == "+" else -1
        i += 1
        digits = ""
        while body[i : i + 1].isdigit():
            digits += body[i]
            i += 1
        repeats = 1
        while body[i : i + 1] == ("+" if sign > 0 else "-"):
            repeats += 1
            i += 1
        charge = sign * (int(digits) if digits else repeats)
    if i != len(body):
        raise _error(smiles, start, f"bracket atom [{body}] has parts this reader does not know")
    return symbol, hydrogens, charge, end + 1


def parse_smiles(smiles: str) -> Molecule:
    """Read a Kekulé SMILES string of H, C, N, O, F (and B) atoms; see the module notes."""
    if not isinstance(smiles, str) or not smiles:
        raise ValueError(f"SMILES must be a non-empty string, got {smiles!r}")
    elements: list[str] = []
    charges: list[int] = []
    explicit_h: list[int | None] = []  # None: organic-subset atom, hydrogens implicit
    bonds: dict[tuple[int, int], int] = {}
    branches: list[int | None] = []
    rings: dict[int, tuple[int, int | None, int]] = {}  # digit -> (atom, order, position)
    previous: int | None = None
    pending: int | None = None  # order of a written bond waiting for its second atom
    i = 0

    def add_bond(a: int, b: int, order: int, pos: int) -> None:
        key = (min(a, b), max(a, b))
        if a == b or key in bonds:
            raise _error(smiles, pos, f"a second bond between atoms {key}")
        bonds[key] = order

    while i < len(smiles):
        c = smiles[i]
        if c in _BOND_ORDERS:
            if pending is not None:
                raise _error(smiles, i, "two bond symbols in a row")
            pending = _BOND_ORDERS[c]
            i += 1
        elif c == "(":
            if previous is None:
                raise _error(smiles, i, "a branch before any atom")
            branches.append(previous)
            i += 1
        elif c == ")":
            if not branches or pending is not None:
                raise _error(smiles, i, "an unmatched ')' or a bond before it")
            previous = branches.pop()
            i += 1
        elif c == ".":
            if pending is not None:
                raise _error(smiles, i, "a bond before '.'")
            previous = None
            i += 1
        elif c.isdigit() or c == "%":
            if previous is None:
                raise _error(smiles, i, "a ring-closure digit before any atom")
            if c == "%":
                if not smiles[i + 1 : i + 3].isdigit() or len(smiles[i + 1 : i + 3]) != 2:
                    raise _error(smiles, i, "'%' must be followed by two digits")
                digit, width = int(smiles[i + 1 : i + 3]), 3
            else:
                digit, width = int(c), 1
            if digit in rings:
                other, order, _ = rings.pop(digit)
                if order is not None and pending is not None and order != pending:
                    raise _error(smiles, i, f"ring bond {digit} has two different orders")
                add_bond(other, previous, pending or order or 1, i)
            else:
                rings[digit] = (previous, pending, i)
            pending = None
            i += width
        else:
            if c == "[":
                symbol, hydrogens, charge, i_next = _bracket(smiles, i)
                explicit_h.append(hydrogens)
            elif c in _VALENCES:
                if smiles[i : i + 2] in ("Cl", "Br"):
                    raise _error(smiles, i, f"element {smiles[i : i + 2]} is not in QM9")
                symbol, charge, i_next = c, 0, i + 1
                explicit_h.append(None)
            elif c in "bcnops":
                raise _error(smiles, i, "aromatic atoms; give the Kekulé form")
            elif c in "/\\@":
                raise _error(smiles, i, "stereochemistry marks")
            else:
                raise _error(smiles, i, f"unexpected character {c!r}")
            atom = len(elements)
            elements.append(symbol)
            charges.append(charge)
            if previous is not None:
                add_bond(previous, atom, pending or 1, i)
            elif pending is not None:
                raise _error(smiles, i, "a bond before the first atom")
            pending, previous, i = None, atom, i_next
    if pending is not None:
        raise _error(smiles, len(smiles), "a bond at the end")
    if branches:
        raise _error(smiles, len(smiles), "an unclosed '('")
    if rings:
        digit, (_, _, pos) = next(iter(rings.items()))
        raise _error(smiles, pos, f"ring bond {digit} is never closed")
    valence = [0] * len(elements)
    for (a, b), order in bonds.items():
        valence[a] += order
        valence[b] += order
    hydrogens = []
    for atom, given in enumerate(explicit_h):
        if given is not None:
            hydrogens.append(given)
            continue
        normal = [v for v in _VALENCES[elements[atom]] if v >= valence[atom]]
        hydrogens.append(normal[0] - valence[atom] if normal else 0)
    return Molecule(
        tuple(elements),
        tuple(charges),
        tuple(hydrogens),
        tuple((a, b, order) for (a, b), order in bonds.items()),
    )
