"""Rows → cells. Every backend returns the same ``Cells`` value.

Backends (``spec.backend``): ``polars`` (default; lazy, streaming, larger than
memory), ``jax`` (the ``kernels.segments`` kernel on the default JAX device)
and ``dask`` (partitions reduced on a Dask cluster, ``spec.scheduler``). They
agree: equal counts, float statistics equal up to rounding.
"""
from __future__ import annotations

from engine.cells import Cells
from engine.spec import Spec
from engine.validate import Checked


def reduce(checked: Checked, spec: Spec) -> Cells:
    """Rows → cells keyed by ``spec.cell_keys`` and arm (a GLM's covariate bin is a key below the
    leaf group: the returned ``Cells`` has the groups as levels and the bin as an extra key)."""
    keys = spec.cell_keys
    if spec.backend == "jax":
        from engine.reduce.jax import reduce_jax
        cells = reduce_jax(checked.rows, keys, spec.outcome, spec.reduce_covariates)
    elif spec.backend == "dask":
        from engine.reduce.dask import reduce_dask
        cells = reduce_dask(checked, spec)
    else:
        from engine.reduce.polars import reduce_polars
        cells = reduce_polars(checked.rows, keys, spec.outcome, spec.reduce_covariates)
    if keys == spec.groups:
        return cells
    return Cells(table=cells.table, levels=spec.groups, covariates=cells.covariates,
                 extra_keys=keys[len(spec.groups):])
