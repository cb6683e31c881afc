"""Rows → cells. Every backend returns the same ``Cells`` value."""
from __future__ import annotations

from engine.cells import Cells
from engine.spec import Spec
from engine.validate import Checked


def reduce(checked: Checked, spec: Spec) -> Cells:
    from engine.reduce.polars import reduce_polars
    return reduce_polars(checked.rows, spec.groups, spec.outcome, spec.covariates)
