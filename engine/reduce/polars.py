"""Rows → cells with Polars: one lazy, streaming group-by over the rows."""
from __future__ import annotations

import polars as pl

from engine.cells import Cells


def cell_aggregates(outcome: str, covariates) -> list[pl.Expr]:
    """Per-cell aggregates; Polars' var/cov are centred, so a large offset is harmless."""
    y = pl.col(outcome).cast(pl.Float64)
    n = pl.len()
    aggregates = [n.cast(pl.Int64).alias("n"), y.mean().alias("mean"),
                  (y.var(ddof=0).fill_null(0.0) * n).alias("m2")]
    xs = {x: pl.col(x).cast(pl.Float64) for x in covariates}
    for x in covariates:
        aggregates.append(xs[x].mean().alias(f"x_mean__{x}"))
    for x in covariates:
        aggregates.append((pl.cov(xs[x], y, ddof=0).fill_null(0.0).fill_nan(0.0) * n).alias(f"xy_m2__{x}"))
    for i, a in enumerate(covariates):
        for b in covariates[i:]:
            aggregates.append((pl.cov(xs[a], xs[b], ddof=0).fill_null(0.0).fill_nan(0.0) * n)
                              .alias(f"xx_m2__{a}__{b}"))
    return aggregates


def reduce_frame(rows: pl.LazyFrame, groups, outcome: str, covariates) -> pl.LazyFrame:
    keys = [*groups, "arm"]
    return rows.group_by(keys).agg(cell_aggregates(outcome, covariates)).sort(keys)


def reduce_polars(rows: pl.LazyFrame, groups, outcome: str, covariates) -> Cells:
    table = reduce_frame(rows, groups, outcome, covariates).collect(engine="streaming")
    return Cells(table=table, levels=tuple(groups), covariates=tuple(covariates))
