"""Rows → cells on a Dask cluster: partitions → partial cells on workers → a fixed merge tree.

Each partition — a Parquet row-group range, a CSV or Arrow file, or one
partition of a Dask DataFrame — is read *on a worker*, put through the same
validated row transformation as every other backend (``RowTransform``: the
columns used, the ``--drop-missing`` filter, treatment → ``arm``), and reduced
there by ``engine.reduce.polars.reduce_polars`` (the same fixed-size batches,
dense route and key codes). Partial cell tables are merged pairwise on the workers,
``engine.cells.merge``, in a binary tree fixed by the partition order, so
only cells travel and the same input gives the same bits whichever worker
ran what, and after a worker dies and its tasks are re-run.

The client is ``spec.scheduler`` (an address such as ``tcp://host:8786``) or,
when none is given, a ``LocalCluster`` of worker processes started for the
call. Workers must see the input files at the same paths (a shared file
system), as for any Dask file source.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import polars as pl

from engine.cells import Cells, merge
from engine.errors import SpecError
from engine.validate import check_file_schemas
from engine.reduce.polars import BATCH_ROWS, reduce_polars
from engine.spec import Spec
from engine.validate import Checked, Source

#: Parquet files larger than this many rows are split at row-group boundaries.
PARTITION_ROWS = 1 << 22
#: Seconds to wait for ``spec.scheduler`` to answer.
CONNECT_TIMEOUT_S = 20
_FILE_KINDS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv",
               ".arrow": "ipc", ".ipc": "ipc", ".feather": "ipc"}


# --- the validated row transformation, as data ---------------------------------------------


@dataclass(frozen=True)
class RowTransform:
    """What ``engine.validate.check`` does to the rows, as picklable Polars expressions.

    ``apply(source.frame)`` builds the same plan as ``checked.rows``; applied
    to one partition's frame it gives that partition's validated rows.
    """

    columns: tuple[str, ...]   # the used columns, in check()'s order
    drop: pl.Expr | None       # True on rows --drop-missing removes; None when nothing is dropped
    arm: pl.Expr               # treatment → 1 treated / 0 control, Int8, named "arm"
    outcome: pl.Expr           # the outcome as Float64, under its own name
    bins: pl.Expr | None = None  # a GLM's covariate bin (``engine.validate.bin_column``), if binned

    def apply(self, frame: pl.LazyFrame) -> pl.LazyFrame:
        rows = frame.select(list(self.columns))
        if self.drop is not None:
            rows = rows.filter(~self.drop)
        rows = rows.with_columns(self.arm, self.outcome)
        return rows.with_columns(self.bins) if self.bins is not None else rows


def row_transform(checked: Checked, spec: Spec) -> RowTransform:
    """Rebuild ``check``'s row transformation and verify it reproduces ``checked.rows``.

    ``Checked`` keeps only the resulting plan, so the expressions are rebuilt
    here from the spec and the checked facts, in the order ``check`` builds
    them, and the two unoptimised plans are compared: a difference is an
    internal error, never silently different rows on the cluster.
    """
    from engine.validate import _coerce, bin_column, value_columns

    columns = (spec.outcome, spec.treatment, *spec.groups, *[c for _, c in value_columns(spec)])
    y = pl.col(spec.outcome).cast(pl.Float64)
    masks = {f"outcome {spec.outcome!r} missing, NaN or infinite": y.is_null() | y.is_nan() | y.is_infinite(),
             f"treatment {spec.treatment!r} missing": pl.col(spec.treatment).is_null()}
    for g in spec.groups:
        masks[f"group {g!r} missing"] = pl.col(g).is_null()
    for role, c in value_columns(spec):
        x = pl.col(c).cast(pl.Float64)
        masks[f"{role} {c!r} missing, NaN or infinite"] = x.is_null() | x.is_nan() | x.is_infinite()
    drop = None
    if checked.dropped:
        unknown = [reason for reason in checked.dropped if reason not in masks]
        if unknown:
            raise RuntimeError(f"dask backend: unknown drop reason(s) {unknown} from validation")
        drop = pl.lit(False)
        for reason in checked.dropped:
            drop = drop | masks[reason]
    dtype = checked.source.frame.collect_schema()[spec.treatment]
    treatment = pl.col(spec.treatment)
    if spec.treated_value is not None:
        treated = treatment == _coerce(spec.treated_value, dtype, spec.treatment)
    elif dtype == pl.Boolean:
        treated = treatment
    else:
        treated = treatment == 1
    transform = RowTransform(columns=columns, drop=drop, arm=treated.cast(pl.Int8).alias("arm"),
                             outcome=y.alias(spec.outcome),
                             bins=bin_column(spec, checked.bin_edges) if spec.binned else None)
    expected = checked.rows.explain(optimized=False)
    if transform.apply(checked.source.frame).explain(optimized=False) != expected:
        raise RuntimeError("dask backend: its copy of validate.check's row transformation no longer "
                           "matches checked.rows; update engine/reduce/dask.py:row_transform")
    return transform


# --- partitions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """One unit of work: a file, a row range of a Parquet file, or a Dask partition."""

    kind: str                      # "parquet", "csv", "ipc" or "dask"
    path: str | None = None
    offset: int = 0                # parquet: first row (a row-group boundary)
    length: int | None = None      # parquet: rows, or None for the whole file
    hive_schema: tuple = ()        # parquet: ((column, dtype), ...) parsed from the path
    separator: str = ","           # csv

    def scan(self) -> pl.LazyFrame:
        if self.kind == "parquet":
            hive = dict(self.hive_schema)
            frame = pl.scan_parquet(self.path, hive_partitioning=bool(hive), hive_schema=hive or None)
            return frame if self.length is None else frame.slice(self.offset, self.length)
        if self.kind == "csv":
            return pl.scan_csv(self.path, separator=self.separator)
        return pl.scan_ipc(self.path)


def file_partitions(source: Source, columns, partition_rows: int = PARTITION_ROWS) -> list[Partition]:
    """The source's files as partitions, in file order; big Parquet files split by row groups."""
    paths = [f.path for f in source.files]
    check_file_schemas(paths, columns)
    full = source.frame.collect_schema()
    parts: list[Partition] = []
    for path in paths:
        kind = _kind(path)
        if kind == "csv":
            parts.append(Partition("csv", path, separator="\t" if path.lower().endswith(".tsv") else ","))
        elif kind == "ipc":
            parts.append(Partition("ipc", path))
        else:
            parts.extend(_parquet_partitions(path, full, partition_rows))
    return parts


def _kind(path: str) -> str:
    return _FILE_KINDS.get(os.path.splitext(path)[1].lower(), "parquet")


def _parquet_partitions(path: str, full: pl.Schema, partition_rows: int) -> list[Partition]:
    import pyarrow.parquet as pq

    own = pl.read_parquet_schema(path)
    # Columns the full scan has but the file lacks come from hive folder names (key=value).
    hive = tuple((name, dtype) for name, dtype in full.items() if name not in own)
    metadata = pq.ParquetFile(path).metadata
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    if sum(groups) <= partition_rows or len(groups) <= 1:
        return [Partition("parquet", path, hive_schema=hive)]
    parts, start, size = [], 0, 0
    for rows in groups:
        if size and size + rows > partition_rows:
            parts.append(Partition("parquet", path, start, size, hive))
            start, size = start + size, 0
        size += rows
    parts.append(Partition("parquet", path, start, size, hive))
    return parts


# --- worker tasks --------------------------------------------------------------------------


def _partition_cells(partition, transform: RowTransform, schema: dict, groups, outcome, covariates,
                     batch_rows: int) -> pl.DataFrame:
    """On a worker: read one partition, validate-transform it, reduce it to cells."""
    if isinstance(partition, Partition):
        frame = partition.scan()
    elif isinstance(partition, pl.DataFrame):
        frame = partition.lazy()
    else:  # a pandas DataFrame: one computed partition of a Dask DataFrame
        frame = pl.from_pandas(partition).lazy()
    frame = frame.cast({c: dtype for c, dtype in schema.items()})
    rows = transform.apply(frame)
    # The polars backend's batches, dense route and key codes (string keys: 2–10× Polars'
    # in-memory group-by, which this loop used before).
    return reduce_polars(rows, groups, outcome, covariates, batch_rows=batch_rows).table


def _merge_pair(left: pl.DataFrame, right: pl.DataFrame, groups, covariates) -> pl.DataFrame:
    # engine.cells.merge interleaves the covariate columns (x_mean__a, xy_m2__a, x_mean__b, …)
    # when it combines duplicates; restore the cell-table order so the next merge can concat.
    return merge([left, right], groups, covariates).select(left.columns)


def merge_tree(parts: list, merge_fn):
    """Pairwise merge in a binary tree fixed by the order of ``parts``: ((p0 p1) (p2 p3)) …"""
    level = list(parts)
    while len(level) > 1:
        paired = [merge_fn(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = paired + ([level[-1]] if len(level) % 2 else [])
    return level[0]


@contextlib.contextmanager
def _client(scheduler: str | None):
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SpecError(f"--scheduler {scheduler!r}: cannot connect ({exc}); check the address, or leave "
                            "--scheduler out to start a local cluster") from None
        with client:
            yield client
        return
    workers = max(1, min(4, os.cpu_count() or 1))
    # ":0": the scheduler's HTTP endpoint on a free port, so two local clusters never collide.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def reduce_dask(checked: Checked, spec: Spec, *, client=None, partition_rows: int = PARTITION_ROWS,
                batch_rows: int = BATCH_ROWS) -> Cells:
    """Rows → cells on a Dask cluster; the same table as ``reduce_polars`` up to rounding.

    ``client``: a ``distributed.Client`` to use; otherwise ``spec.scheduler``
    or a ``LocalCluster`` started (and closed) for this call.
    """
    import dask

    groups, covariates = list(spec.cell_keys), list(spec.reduce_covariates)
    transform = row_transform(checked, spec)
    source = checked.source
    full = source.frame.collect_schema()
    schema = {c: full[c] for c in transform.columns}
    if source.kind == "files":
        parts = file_partitions(source, transform.columns, partition_rows)
    elif source.kind == "dask":
        parts = source.dask_frame[list(transform.columns)].to_delayed()
    else:
        # In-memory input (Polars, pandas, Arrow) lives on this machine: ship it in slices.
        rows = source.frame.select(list(transform.columns)).collect()
        parts = [rows.slice(start, partition_rows) for start in range(0, max(rows.height, 1), partition_rows)]
    cell_fn = dask.delayed(_partition_cells, pure=False)
    merge_fn = dask.delayed(_merge_pair, pure=False)
    tree = merge_tree([cell_fn(p, transform, schema, groups, spec.outcome, covariates, batch_rows)
                       for p in parts], lambda a, b: merge_fn(a, b, groups, covariates))
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(_client(spec.scheduler))
        table = client.compute(tree).result()
    return Cells(table=table, levels=tuple(groups), covariates=tuple(covariates))
