"""Soft-sharing architectures: per-task columns mixed by learned units, and attention or
modulation over a shared network (cross-stitch, sluice, NDDR, MTAN, PS-MCNN, modulation)."""

from polytask.archs.soft_sharing import (  # noqa: F401  importing registers them
    cross_stitch,
    modulation,
    mtan,
    nddr,
    ps_mcnn,
    sluice,
)
