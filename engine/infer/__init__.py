"""Posterior inference: the only stage that compiles and runs JAX programs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Posterior:
    """Draws in the outcome's own units, ready for the effects stage.

    ``groups[l]`` summarises every node's effect at level l (summaries, not
    draws, so that millions of groups fit); ``ate`` and ``new_group`` are
    draws (chains, draws).
    """

    method: str
    method_reason: str
    hyper: dict[str, np.ndarray]             # name -> (chains, draws)
    groups: tuple                            # per level: summaries.GroupSummary
    ate: np.ndarray                          # (chains, draws)
    new_group: np.ndarray                    # (chains, draws)
    diagnostics: dict
    sampler: dict = field(default_factory=dict)
    fit_seconds: float = 0.0
    # GLMs: the same on the link scale (log odds / log rate ratio); ``groups``, ``ate`` and
    # ``new_group`` are then on the outcome scale (risk or rate difference).
    link_groups: tuple = ()
    ate_link: np.ndarray | None = None
    new_group_link: np.ndarray | None = None


def choose_method(requested: str, family: str, n_groups: int) -> tuple[str, str]:
    """The method to run and why (recorded in summary and provenance)."""
    if requested != "auto":
        return requested, "requested"
    if family == "gaussian":
        return "exact", ("Gaussian outcome: group effects integrate out exactly, so NUTS runs over "
                         "the hyperparameters only")
    return "laplace", (f"{family} outcome: each group's (baseline, effect) integrated out by a Laplace "
                       "approximation on the group tree, so NUTS runs over the hyperparameters only")
