"""polytask: multi-task learning for PyTorch.

Balancing methods (``polytask.methods``), architectures (``polytask.archs``), the
Jacobian/Gramian engine
(``polytask.autograd``), the solvers they use (``polytask.solvers``) and multi-task
optimizers (``polytask.optim``).
"""

from importlib.metadata import PackageNotFoundError, version

from polytask import archs, autograd, errors, methods, optim, results, solvers

try:
    __version__ = version("polytask")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "archs", "autograd", "errors", "methods", "optim", "results", "solvers"]
