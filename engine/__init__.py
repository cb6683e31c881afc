"""causal-engine: hierarchical Bayesian treatment effects, from rows to decisions.

Public names: ``fit``, ``simulate``, ``Result``; ``refute``, ``transport`` and
``decide`` (from an estimate to an action); and the errors. Everything else may
move between versions.

The functions ``refute``, ``transport`` and ``decide`` share their names with the
modules that hold them: import from the modules with ``from engine.transport
import ...``, not ``import engine.transport as ...``.
"""
from engine.api import Result, fit
from engine.decide import Decision, decide
from engine.errors import ConvergenceWarning, DataError, EngineError, SchemaError, SpecError
from engine.refute import refute
from engine.simulate import simulate
from engine.transport import Transport, transport

__all__ = ["fit", "simulate", "Result", "refute", "transport", "Transport", "decide", "Decision",
           "EngineError", "SchemaError", "DataError", "SpecError", "ConvergenceWarning"]
