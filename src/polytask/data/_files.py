"""Checks shared by the loaders of data sets that cannot be shipped: the layout under
``root``, the preprocessed ``.npy`` files of MTAN, a seeded hold-out of validation samples.

Every check raises :class:`~polytask.errors.DataNotFoundError` naming the first missing path
and the data set's ``source`` (where to get it and how to unpack it), or
:class:`~polytask.errors.DataFormatError` naming the file whose content is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from polytask.errors import DataFormatError, DataNotFoundError

__all__ = ["check_flag", "check_root", "holdout", "npy_count", "read_npy", "require"]


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming the option."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")
    return value


def check_root(root: str | Path | None, name: str, source: str) -> Path:
    """``root`` as a ``Path`` that exists; ``None`` or a missing folder says where to get
    the data."""
    if root is None:
        raise DataNotFoundError(
            f"{name} must be read from disk: pass root=<folder> (polytask run ... --root). {source}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"{name}: the root folder {path} does not exist. {source}")
    return path


def require(path: Path, name: str, source: str, *, folder: bool = False) -> Path:
    """``path`` if it exists (as a folder when ``folder``), else a message naming it."""
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        raise DataNotFoundError(f"{name}: the {kind} {path} is missing. {source}")
    return path


_INDEX = re.compile(r"^(\d+)\.npy$")


def npy_count(folder: Path, name: str, source: str) -> int:
    """The number n of files ``0.npy`` ... ``(n-1).npy`` in ``folder`` (MTAN's layout);
    a gap in the numbering names the first missing file."""
    require(folder, name, source, folder=True)
    indices = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _INDEX.match(p.name)))
    if not indices:
        raise DataNotFoundError(f"{name}: {folder} holds no <i>.npy files. {source}")
    for expected, found in enumerate(indices):
        if expected != found:
            raise DataNotFoundError(
                f"{name}: {folder / f'{expected}.npy'} is missing ({len(indices)} files, "
                f"numbered up to {indices[-1]}). {source}"
            )
    return len(indices)


def read_npy(path: Path, shape: Sequence[int], name: str) -> np.ndarray:
    """The array in ``path``, checked to have ``shape`` and a numeric dtype."""
    try:
        array = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"{name}: cannot read {path} as a .npy array ({exc})") from None
    if tuple(array.shape) != tuple(shape):
        raise DataFormatError(
            f"{name}: {path} has shape {tuple(array.shape)}, expected {tuple(shape)} "
            "(the preprocessed layout of MTAN; was the data resized?)"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataFormatError(f"{name}: {path} has dtype {array.dtype}, expected a number type")
    return array


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (kept, held-out) indices of ``range(n)``: round(fraction * n) of them (at least
    one when ``fraction > 0``) drawn at random with ``seed``. ``fraction=0`` holds out
    nothing."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"val_fraction={fraction!r} must be a number in [0, 1)")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction={fraction!r} must be in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"data_seed={seed!r} must be an int")
    count = max(1, round(fraction * n)) if fraction > 0 else 0
    if count >= n:
        raise ValueError(
            f"val_fraction={fraction} of {n} samples holds out {count}: need at least one "
            "sample on each side"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[count:]), np.sort(order[:count])
