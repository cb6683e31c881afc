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
    if spec.backend == "jax":
        from engine.reduce.jax import reduce_jax
        return reduce_jax(checked.rows, spec.groups, spec.outcome, spec.reduce_covariates)
    if spec.backend == "dask":
        from engine.reduce.dask import reduce_dask
        return reduce_dask(checked, spec)
    from engine.reduce.polars import reduce_polars
    return reduce_polars(checked.rows, spec.groups, spec.outcome, spec.reduce_covariates)
