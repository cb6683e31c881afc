"""Rows → cells with Polars, streaming, in fixed-size batches merged in a fixed order.

Polars' streaming group-by merges partial sums in whatever order its threads
finish, so the last bits of a cell mean can differ between runs on the same
file; that breaks ``--seed`` reproducibility and the cell hash. Here the rows
stream in order (``collect_batches(maintain_order=True)``), are cut into
batches of exactly ``batch_rows`` rows, each batch is reduced by the
in-memory engine (deterministic), and the batch cells are merged pairwise in
a binary-counter tree (Chan et al. 1979), so the same rows give the same
bits. Memory holds one batch and O(log batches) cell tables.
"""
from __future__ import annotations

import polars as pl

from engine.cells import Cells, merge

BATCH_ROWS = 1 << 22


def sum_columns(covariates, outcome: str) -> list[pl.Expr]:
    """Row-wise sums whose variances give the co-moments (see ``cell_aggregates``)."""
    y = pl.col(outcome).cast(pl.Float64)
    xs = [pl.col(x).cast(pl.Float64) for x in covariates]
    sums = [(x + y).alias(f"_sum__{c}__y") for c, x in zip(covariates, xs)]
    sums += [(xs[i] + xs[j]).alias(f"_sum__{a}__{b}")
             for i, a in enumerate(covariates) for j, b in enumerate(covariates) if j > i]
    return sums


def cell_aggregates(outcome: str, covariates) -> list[pl.Expr]:
    """Per-cell aggregates, all plain ``len``/``mean``/``var`` (Polars' fast group-by path).

    Co-moments come from variances of sums, Σ(x−x̄)(y−ȳ) = n·(var(x+y) − var(x) − var(y))/2;
    Polars' variance is centred, so a large common offset (1e9) costs nothing but the
    rounding of x+y itself. ``pl.cov`` in a group-by took the slow path (2× slower here).
    Needs the columns of ``sum_columns`` on the rows.
    """
    y = pl.col(outcome).cast(pl.Float64)
    n = pl.len()

    def var(expr):
        return expr.var(ddof=0).fill_null(0.0)

    xs = {x: pl.col(x).cast(pl.Float64) for x in covariates}
    aggregates = [n.cast(pl.Int64).alias("n"), y.mean().alias("mean"), (var(y) * n).alias("m2")]
    for x in covariates:
        aggregates.append(xs[x].mean().alias(f"x_mean__{x}"))
    for x in covariates:
        aggregates.append(((var(pl.col(f"_sum__{x}__y")) - var(xs[x]) - var(y)) * n / 2).alias(f"xy_m2__{x}"))
    for i, a in enumerate(covariates):
        for b in covariates[i:]:
            if a == b:
                value = var(xs[a]) * n
            else:
                value = (var(pl.col(f"_sum__{a}__{b}")) - var(xs[a]) - var(xs[b])) * n / 2
            aggregates.append(value.alias(f"xx_m2__{a}__{b}"))
    return aggregates


def reduce_batch(batch: pl.DataFrame, groups, outcome: str, covariates) -> pl.DataFrame:
    keys = [*groups, "arm"]
    rows = batch.lazy().with_columns(sum_columns(covariates, outcome))
    if _one_integer_key(batch, groups):
        # One integer group column: group on (group·2 + arm), one Int64 key, which Polars'
        # in-memory group-by hashes ~1.8× faster than the pair (1e7 rows, machine A), then
        # split it back. The same rows meet in the same order, so the cells are the same bits.
        group, dtype = groups[0], batch.schema[groups[0]]
        joint = (pl.col(group).cast(pl.Int64) * 2 + pl.col("arm").cast(pl.Int64)).alias("_cell")
        return (rows.group_by(joint).agg(cell_aggregates(outcome, covariates)).sort("_cell")
                .select((pl.col("_cell") // 2).cast(dtype).alias(group), (pl.col("_cell") % 2).cast(pl.Int8).alias("arm"),
                        pl.exclude("_cell"))
                .collect(engine="in-memory"))
    return (rows.group_by(keys).agg(cell_aggregates(outcome, covariates)).sort(keys).collect(engine="in-memory"))


def _one_integer_key(batch: pl.DataFrame, groups) -> bool:
    """One integer group column whose values fit ``2·v + arm`` in an Int64, and a 0/1 Int8 arm."""
    if len(groups) != 1 or not batch.schema[groups[0]].is_integer() or batch.schema["arm"] != pl.Int8:
        return False
    if batch.height == 0:
        return True
    low, high = batch.select(pl.col(groups[0]).min().alias("low"), pl.col(groups[0]).max().alias("high")).row(0)
    return low is not None and -(2**61) < low and high < 2**61


class _TreeMerger:
    """Merges equal-sized partial results pairwise, like carries in a binary counter."""

    def __init__(self, groups, covariates):
        self.groups, self.covariates = list(groups), list(covariates)
        self.stack: list[tuple[int, pl.DataFrame]] = []

    def push(self, table: pl.DataFrame) -> None:
        rank = 0
        while self.stack and self.stack[-1][0] == rank:
            _, left = self.stack.pop()
            table = merge([left, table], self.groups, self.covariates)
            rank += 1
        self.stack.append((rank, table))

    def result(self) -> pl.DataFrame:
        table = self.stack.pop()[1]
        while self.stack:
            table = merge([self.stack.pop()[1], table], self.groups, self.covariates)
        return table


def _exact_batches(rows: pl.LazyFrame, batch_rows: int):
    """Batches of exactly ``batch_rows`` rows in row order, whatever chunks Polars yields."""
    pending: list[pl.DataFrame] = []
    count = 0
    for chunk in rows.collect_batches(maintain_order=True, chunk_size=batch_rows):
        pending.append(chunk)
        count += chunk.height
        while count >= batch_rows:
            joined = pl.concat(pending, rechunk=False)
            yield joined[:batch_rows]
            rest = joined[batch_rows:]
            pending, count = ([rest] if rest.height else []), rest.height
    if count:
        yield pl.concat(pending)


def reduce_polars(rows: pl.LazyFrame, groups, outcome: str, covariates, *,
                  batch_rows: int = BATCH_ROWS) -> Cells:
    merger = _TreeMerger(groups, covariates)
    empty = True
    for batch in _exact_batches(rows, batch_rows):
        merger.push(reduce_batch(batch, groups, outcome, covariates))
        empty = False
    if empty:
        table = reduce_batch(rows.head(0).collect(), groups, outcome, covariates)
    else:
        table = merger.result()
    return Cells(table=table, levels=tuple(groups), covariates=tuple(covariates))
