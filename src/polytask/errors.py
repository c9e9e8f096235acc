"""Error classes of polytask.

Every error polytask raises on purpose derives from :class:`PolytaskError`, and also from
the built-in exception a user would expect (``ValueError``, ``TypeError``, ...), so both
``except PolytaskError`` and ``except ValueError`` work. Messages name the offending value
and say what to do.
"""

from __future__ import annotations

__all__ = [
    "DataFormatError",
    "DataNotFoundError",
    "DistributedError",
    "EmptyParametersError",
    "InvalidContextError",
    "InvalidHyperparameterError",
    "InvalidLossesError",
    "MethodStateError",
    "MissingContextError",
    "NonFiniteError",
    "PolytaskError",
    "SolverError",
    "UnknownArchitectureError",
    "UnknownHyperparameterError",
    "UnknownMethodError",
    "UnknownNameError",
]


class PolytaskError(Exception):
    """Base class of every error raised by polytask."""


class UnknownNameError(PolytaskError, ValueError):
    """A registry was asked for a name it does not hold."""


class UnknownArchitectureError(UnknownNameError):
    """``polytask.archs.create`` was given a name that is not registered."""


class UnknownMethodError(UnknownNameError):
    """``polytask.methods.create`` was given a name that is not registered."""


class UnknownHyperparameterError(PolytaskError, TypeError):
    """A method was given a keyword argument it does not accept."""


class InvalidHyperparameterError(PolytaskError, ValueError):
    """A hyper-parameter has a value outside its valid range."""


class InvalidLossesError(PolytaskError, ValueError):
    """``losses`` is not a 1-D tensor of K task losses that requires grad."""


class NonFiniteError(PolytaskError, ValueError):
    """A loss, gradient or update contains NaN or infinity."""


class EmptyParametersError(PolytaskError, ValueError):
    """``shared_params`` holds no parameter that requires grad."""


class MethodStateError(PolytaskError, RuntimeError):
    """A stateful method's hooks were called out of order (e.g. ``after_step`` without a
    preceding ``backward``)."""


class MissingContextError(PolytaskError, TypeError):
    """A method needs context (KPIs, validation losses, ...) that was not passed."""


class InvalidContextError(PolytaskError, ValueError):
    """A context value passed to ``backward(**ctx)`` has the wrong type, shape or range,
    or its key is not a known context key."""


class DataNotFoundError(PolytaskError, FileNotFoundError):
    """A data set's files are not where its loader looks; the message names the missing path
    and where to get the data."""


class DataFormatError(PolytaskError, ValueError):
    """A data set's files are there but not in the expected format (shape, dtype, values)."""


class SolverError(PolytaskError, RuntimeError):
    """An optimisation solver did not converge; carries the final residual."""

    def __init__(self, message: str, *, residual: float | None = None) -> None:
        super().__init__(message)
        self.residual = residual


class DistributedError(PolytaskError, RuntimeError):
    """Balancing across ranks was set up or used in a way that would make them drift apart."""
