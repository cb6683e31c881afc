"""causal-engine: hierarchical Bayesian treatment effects, from rows to decisions.

Public names: ``fit``, ``simulate``, ``Result`` and the errors. Everything else
may move between versions.
"""
from engine.api import Result, fit
from engine.errors import ConvergenceWarning, DataError, EngineError, SchemaError, SpecError
from engine.simulate import simulate

__all__ = ["fit", "simulate", "Result", "EngineError", "SchemaError", "DataError", "SpecError",
           "ConvergenceWarning"]
