"""Results: Δm against single-task baselines, the results store, reports (tables, plots)."""

from polytask.results.delta_m import delta_m
from polytask.results.report import write_report
from polytask.results.store import ResultsStore, RunRecord, RunSpec, run_key

__all__ = ["ResultsStore", "RunRecord", "RunSpec", "delta_m", "run_key", "write_report"]
