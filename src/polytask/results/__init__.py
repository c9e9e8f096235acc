"""Results: Δm against single-task baselines (and, later, the results store and reports)."""

from polytask.results.delta_m import delta_m

__all__ = ["delta_m"]
