"""Checks before any compute: sources, schema, types, values.

Everything here raises a typed ``EngineError`` that names the column, what was
expected, what was found, and the fix. It reads the data once, in a single
lazy aggregate over only the columns the fit uses, to learn row counts, the
treatment's values, missing and non-finite outcomes and the scales the default
priors need. Nothing is written.
"""
from __future__ import annotations

import glob as globlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from engine.errors import DataError, SchemaError, SpecError
from engine.spec import BIN_COLUMN, Spec

_SCANNERS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "csv",
    ".arrow": "ipc", ".ipc": "ipc", ".feather": "ipc",
}


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    mtime: float


@dataclass(frozen=True)
class Source:
    """Where the rows come from: a lazy frame plus what provenance needs."""

    frame: pl.LazyFrame
    kind: str  # "files", "polars", "pandas", "arrow", "dask"
    files: tuple[InputFile, ...] = ()
    dask_frame: object = None  # kind "dask": the Dask DataFrame itself, whose partitions the dask backend reduces


@dataclass(frozen=True)
class Checked:
    """The outcome of validation: a lazy frame ready to reduce, and facts about it."""

    source: Source
    rows: pl.LazyFrame            # filtered rows with column `arm` (int8), ready for reduce
    n_rows_read: int
    n_rows_used: int
    dropped: dict[str, int]       # reason -> rows dropped
    schema: dict[str, str]
    treatment_values: dict[str, str]  # {"treated": repr, "control": repr}
    # Covariate {name: (min, max)} over the used rows, from the validation pass; None when
    # rows were dropped after it (the pass saw them) or there are no rows (cell input).
    covariate_ranges: dict | None = None
    # GLM with covariates (``spec.binned``): the interior bin edges of each covariate, and
    # ``rows`` carries the bin of each row in the column ``engine.spec.BIN_COLUMN``.
    bin_edges: dict | None = None


def _expand_paths(items) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        text = str(item)
        if any(ch in text for ch in "*?["):
            matched = sorted(globlib.glob(text, recursive=True))
            if not matched:
                raise DataError(f"input {text!r}: the pattern matches no files; check the path and glob")
            paths.extend(Path(m) for m in matched if Path(m).is_file())
        else:
            path = Path(text)
            if not path.exists():
                raise DataError(f"input {text!r}: no such file or folder")
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _SCANNERS)
                if not found:
                    raise DataError(
                        f"input folder {text!r} holds no data files (expected .parquet, .csv or .arrow)"
                    )
                paths.extend(found)
            else:
                paths.append(path)
    return paths


def _scan_files(items) -> Source:
    items = [items] if isinstance(items, (str, os.PathLike)) else list(items)
    if not items:
        raise DataError("no input given; pass one or more files, globs or a folder")
    hive_dirs = [Path(str(i)) for i in items if Path(str(i)).is_dir()]
    paths = _expand_paths(items)
    kinds = set()
    for p in paths:
        kind = _SCANNERS.get(p.suffix.lower())
        if kind is None:
            raise DataError(
                f"input {str(p)!r}: unknown file type {p.suffix!r}; expected .parquet, .csv or .arrow"
            )
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"inputs mix file types {sorted(kinds)}; convert them to one type")
    kind = kinds.pop()
    for p in paths:
        if p.stat().st_size == 0:
            raise DataError(f"input {str(p)!r} is empty (0 bytes); remove it or pass a file with rows")
        if not os.access(p, os.R_OK):
            raise DataError(f"input {str(p)!r} cannot be read (permission denied)")
    files = tuple(InputFile(str(p), p.stat().st_size, p.stat().st_mtime) for p in paths)
    str_paths = [str(p) for p in paths]
    check_file_schemas(str_paths)
    try:
        if kind == "parquet":
            frame = pl.scan_parquet(str_paths, hive_partitioning=bool(hive_dirs))
        elif kind == "csv":
            sep = "\t" if paths[0].suffix.lower() == ".tsv" else ","
            frame = pl.concat([pl.scan_csv(p, separator=sep) for p in str_paths], how="vertical")
        else:
            frame = pl.scan_ipc(str_paths)
        frame.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read input {str_paths[:3]}: {type(exc).__name__}: {exc}".strip()) from None
    except OSError as exc:
        raise DataError(f"cannot read input {str_paths[:3]}: {exc}") from None
    return Source(frame=frame, kind="files", files=files)


def _file_schema(path: str, kind: str, separator: str = ",") -> pl.Schema:
    try:
        if kind == "parquet":
            return pl.read_parquet_schema(path)
        if kind == "csv":
            return pl.scan_csv(path, separator=separator).collect_schema()
        return pl.scan_ipc(path).collect_schema()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"cannot read input {path!r}: {type(exc).__name__}: {exc}") from None


def check_file_schemas(paths, columns=None) -> None:
    """Refuse files that disagree on a column's presence or type, naming both files.

    Reads only schemas (Parquet and Arrow footers, a CSV's header and first
    rows). ``columns`` limits the check to the columns used.
    """
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        return
    first = paths[0]
    kind = _SCANNERS.get(os.path.splitext(first)[1].lower(), "parquet")
    separator = "\t" if first.lower().endswith(".tsv") else ","
    reference = _file_schema(first, kind, separator)
    wanted = list(reference.names()) if columns is None else [c for c in columns if c in reference]
    for path in paths[1:]:
        schema = _file_schema(path, kind, separator)
        for column in wanted:
            if column not in schema:
                raise SchemaError(f"column {column!r} is in {first!r} but not in {path!r}; input files "
                                  "must share one schema — add the column or leave the file out")
            if schema[column] != reference[column]:
                raise SchemaError(f"column {column!r} has type {reference[column]} in {first!r} but "
                                  f"{schema[column]} in {path!r}; input files must share one schema — "
                                  "convert them to one type")


def resolve_source(data) -> Source:
    """Turn any accepted input into a lazy frame (no rows are read here)."""
    if isinstance(data, pl.LazyFrame):
        return Source(frame=data, kind="polars")
    if isinstance(data, pl.DataFrame):
        return Source(frame=data.lazy(), kind="polars")
    module = type(data).__module__.split(".")[0]
    if module == "pandas":
        return Source(frame=pl.from_pandas(data).lazy(), kind="pandas")
    if module == "pyarrow":
        return Source(frame=pl.from_arrow(data).lazy(), kind="arrow")
    if module.startswith("dask"):
        if not (hasattr(data, "to_delayed") and hasattr(data, "columns") and hasattr(data, "partitions")):
            raise DataError(f"Dask input of type {type(data).__name__} is not supported; pass a Dask DataFrame")
        # Validation needs a LazyFrame: the schema comes from Dask's metadata (no compute), and
        # rows, when a plan asks for them, from computing one partition at a time through Dask
        # (only the projected columns). The dask backend reduces the partitions on the cluster
        # instead; the polars and jax backends read through this frame.
        from polars.io.plugins import register_io_source

        try:
            schema = pl.from_pandas(data._meta_nonempty).schema
        except Exception as exc:  # noqa: BLE001 - any conversion failure means an unsupported column type
            raise SchemaError(f"Dask DataFrame columns cannot be read as Polars types: {exc}") from None

        def dask_partitions(with_columns, predicate, n_rows, batch_size):
            columns = list(schema.names()) if with_columns is None else list(with_columns)
            wanted = columns or list(schema.names())[:1]  # a row count still needs one column
            seen = 0
            for i in range(data.npartitions):
                part = pl.from_pandas(data[wanted].partitions[i].compute()).cast(
                    {c: schema[c] for c in wanted}).select(columns)
                if predicate is not None:
                    part = part.filter(predicate)
                if n_rows is not None:
                    part = part.head(n_rows - seen)
                seen += part.height
                yield part
                if n_rows is not None and seen >= n_rows:
                    return

        frame = register_io_source(dask_partitions, schema=schema, explain_name="dask",
                                   explain_detail=f"{data.npartitions} partition(s)")
        return Source(frame=frame, kind="dask", dask_frame=data)
    if isinstance(data, (str, os.PathLike, list, tuple)):
        return _scan_files(data)
    raise DataError(
        f"data of type {type(data).__name__} is not supported; pass a path or glob, a Polars "
        "DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table or a Dask DataFrame"
    )


def _is_numeric(dtype) -> bool:
    return dtype.is_numeric() or dtype == pl.Boolean


def check(source: Source, spec: Spec) -> Checked:
    """Validate the source against the spec; return the rows to reduce.

    One aggregate pass reads only the used columns; the scales for default
    priors come later from the cells, so the rows are not read a third time.
    """
    schema = source.frame.collect_schema()
    needed = [spec.outcome, spec.treatment, *spec.groups, *[c for _, c in value_columns(spec)]]
    for role, col in [("outcome", spec.outcome), ("treatment", spec.treatment),
                      *[("group", g) for g in spec.groups], *value_columns(spec)]:
        if col not in schema:
            available = ", ".join(list(schema.names())[:20])
            raise SchemaError(
                f"{role} column {col!r} not found; the data has columns: {available}"
                " — check the spelling or pass the right column"
            )
    for role, col in [("outcome", spec.outcome), *value_columns(spec)]:
        if not _is_numeric(schema[col]):
            # An empty CSV types every column as text: say "no rows" rather than "not a number".
            # Counting rows only here keeps the common case to one pass over the data.
            _refuse_empty(source.frame)
            raise SchemaError(
                f"{role} column {col!r} has type {schema[col]}; expected a number — "
                "convert it or pick another column"
            )
    for col in spec.groups:
        if schema[col].is_float():
            raise SchemaError(
                f"group column {col!r} has type {schema[col]}; expected strings or integers "
                "(floats make poor group keys) — cast it"
            )
    treat_dtype = schema[spec.treatment]
    if treat_dtype == pl.Null or treat_dtype.is_nested():
        raise SchemaError(f"treatment column {spec.treatment!r} has type {treat_dtype}; expected 0/1, bool or two values")

    frame = source.frame.select(needed)
    y = pl.col(spec.outcome).cast(pl.Float64)
    bad_y = y.is_null() | y.is_nan() | y.is_infinite()
    aggregates = [
        pl.len().alias("n"),
        bad_y.sum().alias("bad_outcome"),
        pl.col(spec.treatment).is_null().sum().alias("null_treatment"),
        pl.col(spec.treatment).drop_nulls().unique().sort().head(3).implode().alias("treat_values"),
        pl.col(spec.treatment).drop_nulls().n_unique().alias("treat_n_unique"),
    ]
    for g in spec.groups:
        aggregates.append(pl.col(g).is_null().sum().alias(f"null_group:{g}"))
    for _, c in value_columns(spec):
        x = pl.col(c).cast(pl.Float64)
        aggregates.append((x.is_null() | x.is_nan() | x.is_infinite()).sum().alias(f"bad_cov:{c}"))
        aggregates += [x.min().alias(f"min:{c}"), x.max().alias(f"max:{c}")]
    family_rules = _family_rules(spec)
    for name, (bad, _, shown) in family_rules.items():
        aggregates += [bad.sum().alias(f"rule:{name}"), pl.col(shown).filter(bad).first().alias(f"first:{name}")]
    try:
        facts = frame.select(aggregates).collect().row(0, named=True)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read the data: {type(exc).__name__}: {exc}") from None

    n_read = int(facts["n"])
    if n_read == 0:
        raise DataError("the input has no rows; pass data with at least one treated and one control row")

    drop_masks: dict[str, pl.Expr] = {}
    problems = []
    if facts["bad_outcome"]:
        drop_masks[f"outcome {spec.outcome!r} missing, NaN or infinite"] = bad_y
        problems.append(f"outcome column {spec.outcome!r} has {facts['bad_outcome']} missing, NaN or infinite value(s)")
    if facts["null_treatment"]:
        drop_masks[f"treatment {spec.treatment!r} missing"] = pl.col(spec.treatment).is_null()
        problems.append(f"treatment column {spec.treatment!r} has {facts['null_treatment']} missing value(s)")
    for g in spec.groups:
        if facts[f"null_group:{g}"]:
            drop_masks[f"group {g!r} missing"] = pl.col(g).is_null()
            problems.append(f"group column {g!r} has {facts[f'null_group:{g}']} missing key(s)")
    for role, c in value_columns(spec):
        if facts[f"bad_cov:{c}"]:
            x = pl.col(c).cast(pl.Float64)
            drop_masks[f"{role} {c!r} missing, NaN or infinite"] = x.is_null() | x.is_nan() | x.is_infinite()
            problems.append(f"{role} column {c!r} has {facts[f'bad_cov:{c}']} missing, NaN or infinite value(s)")
    for name, (_, message, _) in family_rules.items():
        if facts[f"rule:{name}"]:
            # Invalid values are not missing ones: --drop-missing does not drop them.
            raise DataError(message.format(count=facts[f"rule:{name}"], first=facts[f"first:{name}"]))
    if problems and not spec.drop_missing:
        raise DataError("; ".join(problems) + " — clean them, or pass --drop-missing (drop_missing=True) "
                        "to drop those rows (provenance counts them)")

    treated_expr, values = _encode_treatment(spec, treat_dtype, facts["treat_values"], int(facts["treat_n_unique"]))
    rows = frame
    dropped: dict[str, int] = {}
    if drop_masks:
        # Count each reason on the rows not already dropped by an earlier reason.
        any_bad = pl.lit(False)
        counts = []
        for reason, mask in drop_masks.items():
            counts.append((mask & ~any_bad).sum().alias(reason))
            any_bad = any_bad | mask
        dropped = {k: int(v) for k, v in frame.select(counts).collect().row(0, named=True).items()}
        rows = frame.filter(~any_bad)
    n_used = n_read - sum(dropped.values())

    rows = rows.with_columns(treated_expr.cast(pl.Int8).alias("arm"), y.alias(spec.outcome))
    if n_used == 0:
        raise DataError("no rows are left after dropping missing values; check the data")
    edges = None
    if spec.binned:
        edges = bin_edges(rows, spec, n_used)
        rows = rows.with_columns(bin_column(spec, edges))
    return Checked(
        source=source, rows=rows, n_rows_read=n_read, n_rows_used=n_used, dropped=dropped,
        schema={k: str(v) for k, v in source.frame.collect_schema().items() if k in needed},
        treatment_values=values,
        covariate_ranges=None if dropped else {c: (facts[f"min:{c}"], facts[f"max:{c}"])
                                               for _, c in value_columns(spec)},
        bin_edges=edges,
    )


# Bin edges come from at most this many evenly spaced rows (deterministic, one pass).
BIN_SAMPLE_ROWS = 1_000_000


def bin_edges(rows: pl.LazyFrame, spec: Spec, n_rows: int) -> dict[str, list[float]]:
    """Interior edges of ``spec.covariate_bins`` quantile bins per covariate (duplicates merged,
    so a covariate with few distinct values gets one bin per value), from every k-th row."""
    import numpy as np

    step = max(1, -(-n_rows // BIN_SAMPLE_ROWS))
    sample = rows.select([pl.col(c).cast(pl.Float64) for c in spec.covariates]).gather_every(step).collect()
    k = spec.covariate_bins
    return {c: [float(e) for e in np.unique(np.quantile(sample[c].to_numpy(), np.arange(1, k) / k))]
            for c in spec.covariates}


def bin_column(spec: Spec, edges: dict[str, list[float]]) -> pl.Expr:
    """Each row's bin: per covariate the count of edges below its value, combined in mixed radix."""
    code, radix = pl.lit(0, pl.Int64), 1
    for c in spec.covariates:
        x = pl.col(c).cast(pl.Float64)
        index = pl.sum_horizontal([(x > e).cast(pl.Int64) for e in edges[c]]) if edges[c] else pl.lit(0, pl.Int64)
        code, radix = code + index * radix, radix * (len(edges[c]) + 1)
    return code.cast(pl.Int32).alias(BIN_COLUMN)


def value_columns(spec: Spec) -> list[tuple[str, str]]:
    """(role, column) of the numeric columns reduced beside the outcome: covariates, and the
    binomial trials or Poisson exposure (reduced like a covariate: its cell mean × n is its sum)."""
    columns = [("covariate", c) for c in spec.covariates]
    if spec.weight_column:
        columns.append(("trials" if spec.family == "binomial" else "exposure", spec.weight_column))
    return columns


def _family_rules(spec: Spec) -> dict[str, tuple[pl.Expr, str, str]]:
    """Values a GLM family cannot take: name -> (mask over rows, message with {count} and {first},
    the column whose first bad value the message shows).

    Missing values are left to the missing-value checks (nulls never match a rule).
    """
    y = pl.col(spec.outcome).cast(pl.Float64)
    finite = y.is_not_null() & y.is_finite()
    col = f"outcome column {spec.outcome!r}"
    whole = y == y.floor()
    if spec.family == "bernoulli":
        return {"binary": (finite & (y != 0) & (y != 1),
                           col + " must be 0/1 (or boolean) for family bernoulli; found {first!r} "
                           "({count} row(s) outside {{0, 1}}) — recode it, or use family binomial/poisson",
                           spec.outcome)}
    if spec.family == "binomial":
        trials = pl.col(spec.trials).cast(pl.Float64)
        known = finite & trials.is_not_null() & trials.is_finite()
        return {
            "successes": (finite & ((y < 0) | ~whole),
                          col + " counts successes and must be a whole number ≥ 0; found {first!r} "
                          "({count} row(s))", spec.outcome),
            "trials": (trials.is_finite() & ((trials < 0) | (trials != trials.floor())),
                       f"trials column {spec.trials!r} must be a whole number ≥ 0; found " + "{first!r} "
                       "({count} row(s))", spec.trials),
            "above": (known & (y > trials),
                      col + f" has more successes than trials ({spec.trials!r}) in " + "{count} row(s) "
                      "(first: {first!r} successes) — check which column is which", spec.outcome),
        }
    if spec.family == "poisson":
        rules = {"counts": (finite & ((y < 0) | ~whole),
                            col + " must be a whole-number count ≥ 0 for family poisson; found {first!r} "
                            "({count} row(s)) — use family gaussian for continuous outcomes", spec.outcome)}
        if spec.exposure:
            e = pl.col(spec.exposure).cast(pl.Float64)
            rules["exposure"] = (e.is_finite() & (e <= 0),
                                 f"exposure column {spec.exposure!r} must be > 0; found " + "{first!r} "
                                 "({count} row(s)) — drop those rows or fix the exposure", spec.exposure)
        return rules
    return {}


def _refuse_empty(frame: pl.LazyFrame) -> None:
    try:
        empty = frame.select(pl.len()).collect().item() == 0
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read the data: {type(exc).__name__}: {exc}") from None
    if empty:
        raise DataError("the input has no rows; pass data with treated and control rows")


def _encode_treatment(spec: Spec, dtype, values: list, n_unique: int):
    col = pl.col(spec.treatment)
    shown = ", ".join(repr(v) for v in values) + (", ..." if n_unique > 3 else "")
    if n_unique != 2:
        raise DataError(
            f"treatment column {spec.treatment!r} has {n_unique} distinct value(s) ({shown}); expected 2 — "
            + ("an effect needs treated and control rows" if n_unique < 2
               else "pass --treated-value and filter the rows to two arms")
        )
    if spec.treated_value is not None:
        target = _coerce(spec.treated_value, dtype, spec.treatment)
        if target not in values:
            raise DataError(
                f"--treated-value {spec.treated_value!r} is not a value of treatment column "
                f"{spec.treatment!r} ({shown}); pass one of those"
            )
        control = [v for v in values if v != target][0]
        return col == target, {"treated": repr(target), "control": repr(control)}
    if dtype == pl.Boolean:
        return col, {"treated": "True", "control": "False"}
    if dtype.is_numeric() and sorted(float(v) for v in values) == [0.0, 1.0]:
        return col == 1, {"treated": "1", "control": "0"}
    raise DataError(
        f"treatment column {spec.treatment!r} has values ({shown}); expected 0/1 or boolean — "
        "pass --treated-value (treated_value=) naming the treated one"
    )


def _coerce(value, dtype, column):
    if dtype == pl.Boolean:
        text = str(value).strip().lower()
        if text in {"true", "1"}:
            return True
        if text in {"false", "0"}:
            return False
    elif dtype.is_integer():
        try:
            as_float = float(value)
            if as_float.is_integer():
                return int(as_float)
        except (TypeError, ValueError):
            pass
    elif dtype.is_float():
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    else:
        return str(value)
    raise SpecError(f"--treated-value {value!r} cannot be read as a value of {column!r} (type {dtype})")


def check_finite_number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{name}: expected a finite number, found {value!r}") from None
    if not math.isfinite(number):
        raise SpecError(f"{name}: expected a finite number, found {value!r}")
    return number


def check_estimates(source: Source, spec: Spec) -> tuple[pl.DataFrame, Checked]:
    """Validate summary-level input: one row per group with an estimate and its standard error.

    Returns the table (group keys, ``estimate``, ``stderr``) and the facts provenance needs.
    """
    schema = source.frame.collect_schema()
    for role, col in [("estimate", spec.estimate), ("stderr", spec.stderr),
                      *[("group", g) for g in spec.groups]]:
        if col not in schema:
            raise SchemaError(f"{role} column {col!r} not found; the data has columns: "
                              f"{', '.join(list(schema.names())[:20])} — check the spelling")
    for role, col in [("estimate", spec.estimate), ("stderr", spec.stderr)]:
        if not schema[col].is_numeric():
            raise SchemaError(f"{role} column {col!r} has type {schema[col]}; expected a number")
    for col in spec.groups:
        if schema[col].is_float():
            raise SchemaError(f"group column {col!r} has type {schema[col]}; expected strings or integers")
    try:
        table = source.frame.select(
            *spec.groups,
            pl.col(spec.estimate).cast(pl.Float64).alias("estimate"),
            pl.col(spec.stderr).cast(pl.Float64).alias("stderr"),
        ).collect()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read the data: {type(exc).__name__}: {exc}") from None
    if table.height == 0:
        raise DataError("the input has no rows; pass one row per group with an estimate and its stderr")
    bad_estimate = table.filter(~pl.col("estimate").is_finite() | pl.col("estimate").is_null())
    if bad_estimate.height:
        raise DataError(f"estimate column {spec.estimate!r} has {bad_estimate.height} missing or non-finite "
                        f"value(s) (first for group {bad_estimate[spec.groups[-1]][0]!r}); fix or remove those rows")
    bad_se = table.filter(~(pl.col("stderr") > 0) | ~pl.col("stderr").is_finite() | pl.col("stderr").is_null())
    if bad_se.height:
        raise DataError(
            f"stderr column {spec.stderr!r} has {bad_se.height} value(s) that are not positive and finite "
            f"(first: {bad_se['stderr'][0]} for group {bad_se[spec.groups[-1]][0]!r}); a standard error must "
            "be > 0 — fix or remove those rows")
    for g in spec.groups:
        if table[g].null_count():
            raise DataError(f"group column {g!r} has {table[g].null_count()} missing key(s); fill or drop them")
    leaf = spec.groups[-1]
    duplicated = table.filter(pl.col(leaf).is_duplicated())
    if duplicated.height:
        raise DataError(f"group {duplicated[leaf][0]!r} has {duplicated.filter(pl.col(leaf) == duplicated[leaf][0]).height} "
                        f"rows; summary-level input takes one estimate per {leaf!r} group — combine them first")
    checked = Checked(source=source, rows=None, n_rows_read=table.height, n_rows_used=table.height, dropped={},
                      schema={k: str(v) for k, v in schema.items()
                              if k in (spec.estimate, spec.stderr, *spec.groups)},
                      treatment_values={})
    return table, checked
