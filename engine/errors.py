"""The engine's typed errors.

Every message names the column or parameter, what was expected, what was
found, and the fix, so that a user can act on it without reading code.
"""


class EngineError(Exception):
    """Base class: anything the user can fix by changing input or options."""


class SchemaError(EngineError):
    """A column is missing or has the wrong type."""


class DataError(EngineError):
    """Values are present but unusable (NaN, one-valued treatment, empty file...)."""


class SpecError(EngineError):
    """The requested specification is invalid (options, priors, method)."""


class ConvergenceWarning(UserWarning):
    """Inference ran but its diagnostics failed the thresholds."""
