"""polytask: multi-task learning for PyTorch.

Balancing methods (``polytask.methods``), architectures (``polytask.archs``) and
regularisers (``polytask.regularizers``), distillation (``polytask.distill``), task specs
and metrics (``polytask.tasks``), the trainer (``polytask.train``), results and Δm
(``polytask.results``), the Jacobian/Gramian engine (``polytask.autograd``), its solvers
(``polytask.solvers``) and multi-task optimizers (``polytask.optim``).
"""

from importlib.metadata import PackageNotFoundError, version

from polytask import (
    archs,
    autograd,
    distill,
    errors,
    methods,
    optim,
    regularizers,
    results,
    solvers,
    tasks,
    train,
)

try:
    __version__ = version("polytask")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "archs",
    "autograd",
    "distill",
    "errors",
    "methods",
    "optim",
    "regularizers",
    "results",
    "solvers",
    "tasks",
    "train",
]
