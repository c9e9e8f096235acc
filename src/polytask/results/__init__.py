"""Results: Δm against single-task baselines and the results store."""

from polytask.results.delta_m import delta_m
from polytask.results.store import ResultsStore, RunRecord, RunSpec, run_key

__all__ = ["ResultsStore", "RunRecord", "RunSpec", "delta_m", "run_key"]
