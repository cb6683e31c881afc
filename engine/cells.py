"""The cell table: one row per leaf group × arm with sufficient statistics.

Columns (DESIGN.md, "The cell table"): one column per grouping level (keys as
in the data, outermost first), ``arm`` (int8), ``n`` (int64), ``mean``
(float64), ``m2`` (float64, Σ(y − mean)²) and, for each covariate ``x``:

- ``x_mean__x``            mean of x in the cell
- ``xy_m2__x``             Σ (x − x̄)(y − ȳ)
- ``xx_m2__x__z``          Σ (x − x̄)(z − z̄), for each covariate pair in order (x ≤ z)

Cell tables from elsewhere may give the sample standard deviation ``sd``
(ddof 1) instead of ``m2``; it is converted on reading (m2 = sd²·(n − 1)).

Cells merge exactly (Chan, Golub & LeVeque 1979): the k-way form used here,
n = Σnᵢ, mean = Σnᵢmeanᵢ/n, m2 = Σm2ᵢ + Σnᵢ(meanᵢ − mean)², is the pairwise
update applied to all parts at once, centred on the combined mean.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from engine.errors import DataError, SchemaError

STAT_COLUMNS = ("arm", "n", "mean", "m2")


def covariate_columns(covariates) -> list[str]:
    names = [f"x_mean__{x}" for x in covariates] + [f"xy_m2__{x}" for x in covariates]
    names += [f"xx_m2__{a}__{b}" for i, a in enumerate(covariates) for b in covariates[i:]]
    return names


def stat_columns(present, count, mean, m2, x_mean, xy_m2, xx_m2, covariates) -> pl.DataFrame:
    """The ``arm`` and statistic columns of the cells at segment indices ``present``
    (segment = 2·leaf code + arm), from per-segment moment arrays: ``x_mean``, ``xy_m2``
    (segments, k) and ``xx_m2`` (segments, k, k). The key columns are the caller's."""
    columns = {"arm": pl.Series("arm", present % 2, pl.Int8), "n": pl.Series("n", count[present], pl.Int64),
               "mean": mean[present], "m2": m2[present]}
    names = iter(covariate_columns(covariates))
    k = len(covariates)
    for j in range(k):
        columns[next(names)] = x_mean[present, j]
    for j in range(k):
        columns[next(names)] = xy_m2[present, j]
    for a in range(k):
        for b in range(a, k):
            columns[next(names)] = xx_m2[present, a, b]
    return pl.DataFrame(columns)


@dataclass(frozen=True)
class Cells:
    """Sufficient statistics per (leaf group, arm), plus which columns are which."""

    table: pl.DataFrame
    levels: tuple[str, ...]
    covariates: tuple[str, ...] = ()
    # Key columns below the leaf group (a GLM's covariate bin): several cells per (leaf, arm).
    extra_keys: tuple[str, ...] = ()

    @property
    def n_rows(self) -> int:
        return int(self.table["n"].sum())

    def pooled_moments(self) -> dict:
        """Mean and sd (ddof 0) of the outcome and each covariate over all rows, exactly."""
        n = self.table["n"].cast(pl.Float64).to_numpy()
        total = n.sum()

        def pooled(mean, m2):
            grand = float(np.dot(n, mean) / total)
            return grand, float(np.sqrt(max((m2.sum() + np.dot(n, (mean - grand) ** 2)) / total, 0.0)))

        out = {"y": pooled(self.table["mean"].to_numpy(), self.table["m2"].to_numpy())}
        for x in self.covariates:
            out[x] = pooled(self.table[f"x_mean__{x}"].to_numpy(), self.table[f"xx_m2__{x}__{x}"].to_numpy())
        return out

    def arm_rows(self) -> tuple[int, int]:
        """(control rows, treated rows)."""
        treated = int(self.table.filter(pl.col("arm") == 1)["n"].sum())
        return self.n_rows - treated, treated

    def content_hash(self) -> str:
        """SHA-256 of the cell table in canonical order (keys, then arm).

        The same data gives the same hash; changing any row changes it. Row
        order can move a float sum's last bit, so reordered rows may hash
        differently.
        """
        table = self.table.sort([*self.levels, *self.extra_keys, "arm"])
        digest = hashlib.sha256()
        for name in table.columns:
            column = table[name]
            digest.update(f"{name}:{column.dtype}\n".encode())
            if column.dtype.is_numeric():
                digest.update(np.ascontiguousarray(column.to_numpy()).tobytes())
            else:
                # The same bytes as "\x1f".join(values), without a Python string per value.
                text = column.cast(pl.String)
                joined = text.str.join("\x1f")[0] if not text.null_count() else "\x1f".join(text.to_list())
                digest.update(joined.encode())
        return digest.hexdigest()

    def write(self, path) -> None:
        self.table.write_parquet(path)


def merge(tables: list[pl.DataFrame], levels, covariates) -> pl.DataFrame:
    """Combine cell tables; the same (group, arm) appearing twice is merged exactly.

    Tables are folded in order with the pairwise update, so the result is
    deterministic; each fold is one join and column arithmetic (no group-by).
    """
    keys = [*levels, "arm"]
    columns = [*keys, "n", "mean", "m2", *covariate_columns(covariates)]
    table = tables[0].select(columns)
    for other in tables[1:]:
        table = merge_pair(table, other.select(columns), levels, covariates)
    if len(tables) == 1 and table.select(pl.struct(keys).is_duplicated().any()).item():
        # Duplicates inside one table (cells appended by hand): split them and fold.
        ranked = table.with_columns(pl.int_range(pl.len()).over(keys).alias("_copy"))
        parts = ranked.partition_by("_copy", maintain_order=True, include_key=False)
        return merge(parts, levels, covariates)
    return table.sort(keys)


def merge_pair(a: pl.DataFrame, b: pl.DataFrame, levels, covariates) -> pl.DataFrame:
    """Chan, Golub & LeVeque's pairwise update of two cell tables, matched on (keys, arm)."""
    keys = [*levels, "arm"]
    stats = ["n", "mean", "m2", *covariate_columns(covariates)]
    outside = None
    if levels and a.height and b.height and not (a[levels[0]].null_count() or b[levels[0]].null_count()):
        # Only cells whose top-level key lies in both tables' key ranges can meet: the rest are
        # stacked, not joined. Tables of data sorted by group overlap in one key at most, and a
        # join of millions of rows (1.4 s at 10⁷ groups) becomes a few filters.
        (a_low, a_high), (b_low, b_high) = (
            t.select(pl.col(levels[0]).min().alias("low"), pl.col(levels[0]).max().alias("high")).row(0)
            for t in (a, b))
        low, high = max(a_low, b_low), min(a_high, b_high)
        if high < low:
            return pl.concat([a, b] if a_high < b_low else [b, a], how="vertical_relaxed")
        merged = _merge_sorted(a, b, levels, covariates, min(a_low, b_low))
        if merged is not None:
            return merged
        inside = pl.col(levels[0]).is_between(pl.lit(low), pl.lit(high))   # strings would name columns
        outside = pl.concat([a.filter(~inside), b.filter(~inside)], how="vertical_relaxed")
        a, b = a.filter(inside), b.filter(inside)
    joined = a.join(b, on=keys, how="full", coalesce=True, suffix="_b", nulls_equal=True)
    na = pl.col("n").fill_null(0).cast(pl.Float64)
    nb = pl.col("n_b").fill_null(0).cast(pl.Float64)
    total = na + nb
    wb = nb / total  # the share of b; 0 where b has no such cell, 1 where a has none

    def mean_of(col):
        # a's mean shifted toward b's by b's share: exact when either side is absent.
        ma, mb = pl.col(col), pl.col(f"{col}_b")
        return pl.when(ma.is_null()).then(mb).when(mb.is_null()).then(ma).otherwise(ma + (mb - ma) * wb)

    def delta(col):
        return (pl.col(f"{col}_b") - pl.col(col)).fill_null(0.0)

    cross = na * nb / total
    out = [pl.col(k) for k in keys]
    out.append((pl.col("n").fill_null(0) + pl.col("n_b").fill_null(0)).alias("n"))
    out.append(mean_of("mean").alias("mean"))
    out.append((pl.col("m2").fill_null(0.0) + pl.col("m2_b").fill_null(0.0) + delta("mean") ** 2 * cross).alias("m2"))
    for x in covariates:
        out.append(mean_of(f"x_mean__{x}").alias(f"x_mean__{x}"))
    for x in covariates:
        out.append((pl.col(f"xy_m2__{x}").fill_null(0.0) + pl.col(f"xy_m2__{x}_b").fill_null(0.0)
                    + delta(f"x_mean__{x}") * delta("mean") * cross).alias(f"xy_m2__{x}"))
    for i, u in enumerate(covariates):
        for v in covariates[i:]:
            name = f"xx_m2__{u}__{v}"
            out.append((pl.col(name).fill_null(0.0) + pl.col(f"{name}_b").fill_null(0.0)
                        + delta(f"x_mean__{u}") * delta(f"x_mean__{v}") * cross).alias(name))
    del stats
    merged = joined.select(out)
    if outside is None or not outside.height:
        return merged
    return pl.concat([merged, outside.select(merged.columns)], how="vertical_relaxed")


def _merge_sorted(a: pl.DataFrame, b: pl.DataFrame, levels, covariates, low) -> pl.DataFrame | None:
    """``merge_pair`` without a join, for tables of one integer key sorted by (key, arm) (the
    reduction's dense route makes them, and ``merge`` returns them): one compiled pass over
    both (``engine.reduce.fused.merge_sorted``) with the same arithmetic as the join's
    expressions, so the same bits. A join of 2·8·10⁵ cells took ~0.35 s here. None where it
    does not apply (Numba missing, several levels, other keys, arms other than 0/1, unsorted
    or repeated cells): the join then runs."""
    from engine.reduce import fused

    key = levels[0] if len(levels) == 1 else None
    if fused.numba is None or key is None or not a.schema[key].is_integer() or a.schema[key] != b.schema[key]:
        return None
    stats = ["n", "mean", "m2", *covariate_columns(covariates)]
    base = np.int64(np.uint64(int(low) % 2**64).astype(np.int64))   # UInt64 keys wrap alike
    slots, tables = [], []
    for table in (a, b):
        if table["arm"].null_count() or table[key].null_count():
            return None
        arm = table["arm"].to_numpy().astype(np.int64)
        if arm.size and (arm.min() < 0 or arm.max() > 1):
            return None
        slots.append(2 * (table[key].to_numpy().astype(np.int64) - base) + arm)
        tables.append(table.select(pl.col(stats).cast(pl.Float64)).to_numpy(order="fortran"))
    merged = fused.merge_sorted(*slots, *tables, len(covariates))
    if merged is None:
        return None
    slot, values = merged
    offset = slot // 2
    keys = (offset.astype(np.uint64) + np.uint64(int(low) % 2**64) if a.schema[key] == pl.UInt64
            else offset + np.int64(int(low)))
    columns = {key: pl.Series(key, keys).cast(a.schema[key]), "arm": pl.Series("arm", slot % 2).cast(a.schema["arm"]),
               "n": pl.Series("n", values[:, 0]).cast(a.schema["n"])}
    columns.update({name: values[:, c] for c, name in enumerate(stats) if c})
    return pl.DataFrame(columns)


def read(paths, levels=None) -> Cells:
    """Read one or more cell tables (from ``causal-engine reduce``) and merge them."""
    tables = []
    for path in paths:
        try:
            tables.append(pl.read_parquet(path))
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise DataError(f"cannot read cell table {str(path)!r}: {exc}") from None
    # Another site's per-cell summaries may carry the sample sd (ddof 1) instead of M2.
    tables = [t.with_columns((pl.col("sd").fill_null(0.0) ** 2 * (pl.col("n") - 1)).alias("m2")).drop("sd")
              if "m2" not in t.columns and "sd" in t.columns else t for t in tables]
    for path, table in zip(paths, tables):
        if {"n", "mean"} <= set(table.columns):
            bad = table.filter((pl.col("n") < 1) | (pl.col("n") != pl.col("n").floor()) | ~pl.col("mean").is_finite()
                               | ~pl.col("m2").is_finite() | (pl.col("m2") < 0)) if "m2" in table.columns \
                else table.head(0)
            if bad.height:
                raise DataError(f"cell table {str(path)!r} has {bad.height} cell(s) with n < 1 or not a whole "
                                "number, a non-finite mean or a negative/non-finite m2 (or sd); fix those cells")
    first = tables[0]
    missing = [c for c in ("arm", "n", "mean", "m2") if c not in first.columns]
    if missing:
        raise SchemaError(f"cell table {str(paths[0])!r} lacks column(s) {missing}; expected the output of "
                          "`causal-engine reduce` (or per-cell n, mean and sd with the group keys and arm)")
    stat = set(STAT_COLUMNS)
    found_levels = [c for c in first.columns if c not in stat and "__" not in c]
    covariates = tuple(c[len("x_mean__"):] for c in first.columns if c.startswith("x_mean__"))
    if levels is not None and list(levels) != found_levels:
        raise SchemaError(f"cell table levels {found_levels} differ from --group {list(levels)}")
    for path, table in zip(paths, tables):
        nulls = [c for c in found_levels if c in table.columns and table[c].null_count()]
        if nulls:
            raise DataError(f"cell table {str(path)!r} has null group keys in {nulls}; every cell needs its "
                            "group (drop or name those cells before sharing the table)")
        if table.columns != first.columns:
            raise SchemaError(
                f"cell tables {str(paths[0])!r} and {str(path)!r} have different columns "
                f"({first.columns} vs {table.columns}); reduce both with the same options"
            )
    table = merge(tables, found_levels, covariates)
    return Cells(table=table, levels=tuple(found_levels), covariates=covariates)


def write_cells(cells: Cells, path, metadata: dict) -> None:
    """Write a cell table atomically, with what it was reduced from as Parquet metadata."""
    import os
    import tempfile
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        meta = {f"causal_engine.{k}": str(v) for k, v in metadata.items()}
        meta["causal_engine.levels"] = ",".join(cells.levels)
        cells.table.write_parquet(tmp, metadata=meta)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path) -> dict:
    """What `write_cells` recorded (empty for cell tables from elsewhere)."""
    try:
        meta = pl.read_parquet_metadata(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"cannot read cell table {str(path)!r}: {exc}") from None
    prefix = "causal_engine."
    return {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
