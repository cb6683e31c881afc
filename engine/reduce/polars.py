"""Rows → cells with Polars, streaming, in fixed-size batches merged in a fixed order.

Polars' streaming group-by merges partial sums in whatever order its threads
finish, so the last bits of a cell mean can differ between runs on the same
file; that breaks ``--seed`` reproducibility and the cell hash. Here the rows
stream in order (``collect_batches(maintain_order=True)``) and are cut into
batches of exactly ``batch_rows`` rows. Each batch is reduced one of two ways,
both deterministic:

- one integer group column whose keys span a narrow range (at most twice the
  batch's rows, or ``DENSE_MIN_KEYS``): ``kernels.host``, NumPy ``bincount``
  passes over segments ``2·(key − low) + arm``, no hashing; successive such
  batches fold into one set of arrays over their joint key range
  (``_DenseRun``), with no table joins;
- one string group column, or several key columns (nested levels, a GLM's bin): coded to
  one integer in first-seen order (``_KeyCodes``: ``engine.reduce.hashed``'s tables, which
  compare keys by their bytes, so no two keys share a code), then the dense route as above,
  the keys put back at the end;
- any other keys: Polars' in-memory group-by (``cell_aggregates``).

The batch (or run) cell tables are merged pairwise in a binary-counter tree
(Chan et al. 1979), so the same rows give the same bits. Memory holds one
batch, one run and O(log batches) cell tables: with the default 2²²-row
batches of four columns the process peaks ~650 MB above its start on machine
A, whatever the data's rows (a test holds a 2¹⁸-row-batch reduction of 680 MB
of rows to a 200 MiB data-segment limit). The cells themselves grow with the
keys: a dense run holds ``1 + 2(k+1) + (k+1)²`` float64 a segment (two per
key), up to ``DENSE_MAX_KEYS`` keys, and briefly twice that while it widens. Key codes
hold each distinct key once (a 24-byte slot, at most half full, and a long string's bytes);
a batch's strings are read where Polars keeps them, not copied.
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
    """One batch of rows (with ``arm``) → its cell table, sorted by (keys, arm); deterministic."""
    span = _dense_integer_span(batch, groups, outcome, covariates)
    if span is not None:
        return _reduce_dense(batch, groups[0], outcome, covariates, span)
    return _grouped_batch(batch, groups, outcome, covariates)


def _grouped_batch(batch: pl.DataFrame, groups, outcome: str, covariates) -> pl.DataFrame:
    """``reduce_batch`` by Polars' in-memory group-by (keys the dense route does not take)."""
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


#: The dense route indexes a segment per (key, arm) over the batch's key range; it is taken
#: while that range is at most this many keys, or twice the batch's rows, whichever is larger
#: (beyond, most segments would be empty), and never beyond ``DENSE_MAX_KEYS``.
DENSE_MIN_KEYS = 1 << 16
DENSE_MAX_KEYS = 1 << 23
#: A dense run refolds a segment whose sums about its shift would leave this relative rounding
#: error in its M2 (see ``_DenseRun._far``).
SHIFT_TOLERANCE = 1e-11


def _dense_integer_span(batch: pl.DataFrame, groups, outcome: str, covariates) -> tuple[int, int] | None:
    """(lowest key, key range) when one integer group column spans few enough keys, else None.

    The route also needs an Int8 0/1 arm and no nulls in the columns it reads (the validated
    rows have none; a null would be counted by ``np.bincount``).
    """
    if batch.schema["arm"] != pl.Int8 or any(batch[c].null_count() for c in ("arm", outcome, *covariates)):
        return None
    return dense_key_span(batch, groups)


def dense_key_span(frame: pl.DataFrame, groups) -> tuple[int, int] | None:
    """(lowest key, key range) of one null-free integer group column whose range is at most
    twice the rows (or ``DENSE_MIN_KEYS``) and ``DENSE_MAX_KEYS``; None for any other keys.
    The reduce backends index cells by ``key − low`` over such a range, without hashing."""
    if len(groups) != 1 or frame.height == 0:
        return None
    group = groups[0]
    if not frame.schema[group].is_integer() or frame[group].null_count():
        return None
    low, high = frame.select(pl.col(group).min().alias("low"), pl.col(group).max().alias("high")).row(0)
    span = int(high) - int(low) + 1
    if span > min(max(2 * frame.height, DENSE_MIN_KEYS), DENSE_MAX_KEYS):
        return None
    return int(low), span


def key_offsets(group: str, dtype, low: int) -> pl.Expr:
    """``key − low`` as Int64, never wrapping: signed keys are widened to Int64 first (an Int8
    range from −100 to 100 does not fit an Int8 difference), unsigned ones subtract in
    their own type (``key ≥ low``; UInt64 keys above 2⁶³ do not fit an Int64)."""
    if dtype.is_unsigned_integer():
        return (pl.col(group) - pl.lit(low, dtype=dtype)).cast(pl.Int64)
    return pl.col(group).cast(pl.Int64) - low


def keys_at(offsets, low: int, dtype) -> pl.Series:
    """The keys ``low + offset`` in the group column's own type (the inverse of ``key_offsets``)."""
    import numpy as np

    offsets = pl.Series(np.asarray(offsets, dtype=np.int64))
    if dtype.is_unsigned_integer():
        return offsets.cast(dtype) + pl.Series([low]).cast(dtype)
    return (offsets + low).cast(dtype)


def host_passes():
    """The passes of ``kernels.host``: one compiled loop each (``engine.reduce.fused``, Numba)
    unless ``CAUSAL_ENGINE_HOST_PASSES=numpy`` or Numba is missing, then ``np.bincount``'s."""
    import os

    from kernels import host

    choice = os.environ.get("CAUSAL_ENGINE_HOST_PASSES", "fused").lower()
    if choice not in ("fused", "numpy"):
        from engine.errors import SpecError
        raise SpecError(f"CAUSAL_ENGINE_HOST_PASSES={choice!r}: expected 'fused' or 'numpy'")
    if choice == "numpy":
        return host.NUMPY
    from engine.reduce import fused
    return fused.PASSES or host.NUMPY


def _reduce_dense(batch: pl.DataFrame, group: str, outcome: str, covariates, span) -> pl.DataFrame:
    """Cells by ``kernels.host`` over segments ``2·(key − low) + arm``: no hashing, no sort.

    The corrected two-pass moments in fixed row order (see ``kernels.host``): the same
    statistics as ``cell_aggregates`` up to rounding, and the same bits on every run."""
    from kernels import host

    passes = host_passes()
    return _dense_sums_table(host.accumulate(*_dense_arrays(batch, group, outcome, covariates, span[0], passes),
                                             2 * span[1], passes=passes),
                             span[0], group, batch.schema[group], covariates)


def _dense_arrays(batch: pl.DataFrame, group: str, outcome: str, covariates, low: int, passes):
    """(segment ids ``2·(key − low) + arm``, y, x (rows, k) Fortran order) as NumPy arrays; the
    ids by a compiled loop when ``passes`` are the compiled ones, else by Polars."""
    from kernels import host

    if passes is not host.NUMPY:   # one compiled pass over the key and arm columns as they are
        from engine.reduce import fused
        return (fused.segment_ids(*_key_and_arm(batch, group), low), *_dense_values(batch, outcome, covariates))
    segment = (key_offsets(group, batch.schema[group], low) * 2 + pl.col("arm").cast(pl.Int64)).alias("_segment")
    return (batch.select(segment)["_segment"].to_numpy(), *_dense_values(batch, outcome, covariates))


def _dense_values(batch: pl.DataFrame, outcome: str, covariates):
    """y (rows,) and x (rows, k) Fortran order, float64, as NumPy arrays."""
    import numpy as np

    frame = batch.select(pl.col(outcome).cast(pl.Float64).alias("_y"), *[pl.col(c).cast(pl.Float64) for c in covariates])
    x = frame.select(covariates).to_numpy(order="fortran") if covariates else np.zeros((frame.height, 0))
    return frame["_y"].to_numpy(), x


def _key_and_arm(batch: pl.DataFrame, group: str):
    """The key and arm columns as NumPy arrays, as Polars holds them (no copies)."""
    return batch[group].to_numpy(), batch["arm"].to_numpy()


def _dense_sums_table(sums, low: int, group: str, dtype, covariates) -> pl.DataFrame:
    """``kernels.host.Sums`` over segments ``2·(key − low) + arm`` → the cell table of the
    present cells: ``_dense_table(host.finish(sums), …)``, by one compiled loop where Numba is."""
    from kernels import host

    from engine.reduce import fused

    if fused.numba is None:
        return _dense_table(host.finish(sums), low, group, dtype, covariates)
    from engine.cells import covariate_columns

    present, n, columns = fused.cell_columns(sums)
    names = ["mean", "m2", *covariate_columns(covariates)]
    return pl.DataFrame([keys_at(present // 2, low, dtype).alias(group), pl.Series("arm", present % 2, pl.Int8),
                         pl.Series("n", n), *[pl.Series(name, columns[:, j]) for j, name in enumerate(names)]])


def _dense_table(moments, low: int, group: str, dtype, covariates) -> pl.DataFrame:
    """Moments over segments ``2·(key − low) + arm`` → the cell table of the present cells."""
    import numpy as np

    from engine.cells import stat_columns

    present = np.flatnonzero(moments.count)   # ascending: key, then arm
    keys = keys_at(present // 2, low, dtype).alias(group)
    return stat_columns(present, *moments, covariates).insert_column(0, keys)


class _DenseRun:
    """Successive dense batches folded over their joint key range, no table joins.

    The run keeps ``kernels.host.Sums``: deviation sums about a shift per segment, set by the
    first batch that had the segment (its first-pass mean; on the direct route of
    ``fused.direct_sums``, from 2¹¹ segments, its first row, or its mean where that row lies
    far out). A later batch's sums about the same shifts just add, in place (O(batch key
    range), no merge of finished moments; ``fused.direct_fold`` adds them as it makes them),
    and a batch whose segments all have shifts skips its first pass but for the count. Batches
    whose keys fall in one range at most ``DENSE_MAX_KEYS`` wide (and at most twice the rows
    seen, or ``DENSE_MIN_KEYS``) join the run; ``table()`` hands it to the tree merger.
    Which batches form a run depends only on the data, so the result is the same bits on
    every run.
    """

    def __init__(self, group: str, dtype, covariates):
        self.group, self.dtype, self.covariates = group, dtype, list(covariates)
        self.low = self.keys = self.rows = 0
        # The arrays cover keys base … base + capacity − 1, a superset of the run's range
        # low … low + keys − 1: they grow geometrically, so keys that drift (sorted data)
        # cost O(keys) copying in all, not O(keys) a batch.
        self.base = self.capacity = 0
        self.state = None
        self.scratch = None   # fused.Scratch: the direct pass's tables, from batch to batch

    def fits(self, span, rows: int) -> bool:
        if self.state is None:
            return True
        low = min(self.low, span[0])
        keys = max(self.low + self.keys, span[0] + span[1]) - low
        return keys <= min(max(2 * (self.rows + rows), DENSE_MIN_KEYS), DENSE_MAX_KEYS)

    def add(self, batch: pl.DataFrame, outcome: str, span) -> None:
        from engine.reduce import fused

        passes = host_passes()
        if self.state is None:
            self.state, _ = self._sums(batch, outcome, span, passes)
            (self.low, self.keys), self.rows = span, batch.height
            self.base, self.capacity = span
            return
        self._cover(span)
        window = slice(2 * (span[0] - self.base), 2 * (span[0] - self.base + span[1]))
        count, shift, sums, products = self.state
        direct = self._direct(passes, span)
        if direct:
            # Added in place but for the segments that fail the far test, which stay as they were.
            key, arm = _key_and_arm(batch, self.group)
            y, x = _dense_values(batch, outcome, self.covariates)
            here = tuple(a[..., window] for a in self.state)
            far = fused.direct_fold(key, y, x, here, SHIFT_TOLERANCE, arm=arm, low=span[0], scratch=self._scratch())
            arrays = None
        else:
            part, arrays = self._sums(batch, outcome, span, passes, shift[:, window], count[window] > 0)
            far = self._far(part, window)
        rebased = None
        if far.any():   # from the run's sums before this batch: the in-place add below, or none
            arrays = arrays or _dense_arrays(batch, self.group, outcome, self.covariates, span[0], passes)
            rebased = self._rebase(far, arrays, window)
        if not direct:
            shift[:, window] = part.shift        # unchanged where seen; the batch's own elsewhere
            count[window] += part.count
            sums[:, window] += part.sums
            products[:, :, window] += part.products
        if rebased is not None:
            for mine, theirs in zip(self.state, rebased):
                mine[..., window][..., far] = theirs[..., far]
        self.rows += batch.height

    def _scratch(self):
        from engine.reduce import fused

        self.scratch = self.scratch or fused.Scratch()
        return self.scratch

    @staticmethod
    def _direct(passes, span) -> bool:
        """Whether the batch's segments are many enough for ``fused.direct_sums``' pass."""
        from engine.reduce import fused

        return passes is fused.PASSES and passes is not None and 2 * span[1] >= fused.DIRECT_SEGMENTS

    def _sums(self, batch: pl.DataFrame, outcome: str, span, passes, shift=None, seen=None):
        """The batch's ``kernels.host.Sums`` over its ``span``, about ``shift`` where ``seen``,
        and the (segment ids, y, x) arrays where they were made (else None). From the key and
        arm columns themselves, with no id array, where the compiled passes allow: one direct
        pass at many segments (``fused.direct_sums``), one counting pass where every segment
        has a shift (``fused.keyed_sums``)."""
        from kernels import host

        from engine.reduce import fused

        segments = 2 * span[1]
        if self._direct(passes, span):
            key, arm = _key_and_arm(batch, self.group)
            y, x = _dense_values(batch, outcome, self.covariates)
            return fused.direct_sums(key, y, x, segments, shift, seen, arm=arm, low=span[0],
                                     scratch=self._scratch()), None
        if seen is not None and fused.keyed_applies(passes, segments) and seen.all():
            y, x = _dense_values(batch, outcome, self.covariates)
            return fused.keyed_sums(*_key_and_arm(batch, self.group), span[0], y, x, shift, segments), None
        arrays = _dense_arrays(batch, self.group, outcome, self.covariates, span[0], passes)
        return host.accumulate(*arrays, segments, shift=shift, seen=seen, passes=passes), arrays

    def _far(self, part, window):
        """Segments whose sums about their shift would cost M2 more than ``SHIFT_TOLERANCE``
        (``far_segments``), after adding ``part`` to the run's ``window``."""
        from kernels import host

        from engine.reduce import fused

        here = host.Sums(*(a[..., window] for a in self.state))
        if fused.numba is not None:
            return fused.far_segments(here, part, SHIFT_TOLERANCE)
        return far_segments(here, part, SHIFT_TOLERANCE)

    def _rebase(self, far, arrays, window):
        """The run's moments of the ``far`` segments merged with this batch's, by Chan's update
        of finished moments (the batch's by its own two-pass), as sums about the new means;
        they replace whatever the in-place add gave those segments.
        """
        from kernels import host

        ids, y, x = arrays
        rows = far[ids]
        own = host.reduce(ids[rows], y[rows], x[rows], far.shape[0], threads=1, passes=host_passes())
        before = host.finish(host.Sums(*(a[..., window] for a in self.state)))
        return host.as_sums(host.merge(before, own))

    def _cover(self, span) -> None:
        """Extend the run's key range to ``span``'s, widening the arrays (zeros) when they
        do not reach: by at least their own size on that side (capped at DENSE_MAX_KEYS)."""
        import numpy as np

        from kernels import host

        low = min(self.low, span[0])
        high = max(self.low + self.keys, span[0] + span[1])
        self.low, self.keys = low, high - low
        end = self.base + self.capacity
        if low >= self.base and high <= end:
            return
        # Slack beyond what the range needs, at most the arrays' size and never past
        # DENSE_MAX_KEYS in all (the run's range itself stays within it: ``fits``).
        needed = max(end, high) - min(self.base, low)
        grow = max(min(self.capacity, DENSE_MAX_KEYS - needed), 0)
        if low < self.base and high > end:
            grow //= 2
        before = self.base - low + grow if low < self.base else 0
        after = high - end + grow if high > end else 0

        def widen(array):
            out = np.zeros(array.shape[:-1] + (array.shape[-1] + 2 * (before + after),), array.dtype)
            out[..., 2 * before:2 * before + array.shape[-1]] = array
            return out

        self.state = host.Sums(*(widen(a) for a in self.state))
        self.base, self.capacity = self.base - before, self.capacity + before + after

    def table(self) -> pl.DataFrame:
        from kernels import host

        start = 2 * (self.low - self.base)
        window = slice(start, start + 2 * self.keys)
        table = _dense_sums_table(host.Sums(*(a[..., window] for a in self.state)), self.low, self.group,
                                  self.dtype, self.covariates)
        self.state, self.rows, self.scratch = None, 0, None
        return table


def far_segments(state, part, tolerance: float):
    """Segments whose sums about their shift, once ``part`` is added to ``state`` (both
    ``kernels.host.Sums`` over the same segments), would cost M2 more than ``tolerance``.

    ``finish`` forms M2 = Σd² − (Σd)²/n from row-order sums whose rounding is ~ε·√n·Σd²,
    so the relative error of M2 is ~ε·√n·Σd²/M2: ~ε·√n for rows near their shift, but
    Σd²/M2 grows with the squared distance of the rows from the shift. A level that
    drifts (sorted or time-ordered data) or jumps that far is refolded (``_DenseRun._rebase``).
    ``engine.reduce.fused.far_segments`` is the same test as one compiled loop.
    """
    import numpy as np

    n = np.maximum(state.count + part.count, 1)
    total = state.sums + part.sums
    square = (state.products + part.products).diagonal().T      # Σd² (k+1, S)
    m2 = square - total * total / n
    with np.errstate(invalid="ignore"):
        far = np.finfo(np.float64).eps * np.sqrt(n) * square > tolerance * m2
    return far.any(axis=0) & (part.count > 0)


def _one_integer_key(batch: pl.DataFrame, groups) -> bool:
    """One integer group column whose values fit ``2·v + arm`` in an Int64, and a 0/1 Int8 arm."""
    if len(groups) != 1 or not batch.schema[groups[0]].is_integer() or batch.schema["arm"] != pl.Int8:
        return False
    if batch.height == 0:
        return True
    low, high = batch.select(pl.col(groups[0]).min().alias("low"), pl.col(groups[0]).max().alias("high")).row(0)
    return low is not None and -(2**61) < low and high < 2**61


class _CodesDecline(Exception):
    """``_KeyCodes`` cannot code these rows (null keys, which only unvalidated rows have):
    ``reduce_polars`` starts over by the group-by, which keeps a null key's arms apart."""


class _KeyCodes:
    """The group key columns (one string column, or several string or integer columns: nested
    levels, a GLM's covariate bin) as one Int64 code, 0, 1, 2, … in the order keys first
    appear, the same code in every batch, and the key columns back from the codes at the end.

    Polars' in-memory group-by over strings with variances took 0.19 s a 2²²-row batch at 100
    keys (machine A); with codes the batch takes the dense route (``kernels.host``). The codes
    come from ``engine.reduce.hashed``'s tables, which compare keys by their bytes: each
    string column has its own table, and several columns are combined one at a time by a
    table of (codes so far, next column) pairs; the last (string) column's codes serve alone
    while it determines the columns above it, as nested levels do. The codes depend only on
    the rows' order, so the cells are the same bits on every run: the same as the dense route
    gives integer keys numbered in first-seen order (a test).
    """

    CODE = "__key_code"

    def __init__(self, groups, schema):
        from engine.reduce.hashed import CodeTable, Nesting

        self.groups = list(groups)
        self.strings = {g: CodeTable() for g in self.groups if schema[g] == pl.String}
        self.pairs = [CodeTable() for _ in self.groups[1:]]
        self.nesting = Nesting() if len(self.groups) > 1 and self.groups[-1] in self.strings else None
        self.keys = pl.DataFrame(schema={g: schema[g] for g in self.groups})

    @classmethod
    def applies(cls, schema, groups) -> bool:
        """One string column, or several string or integer (to 64 bits) ones (one integer column
        already takes the dense route), no column named like the code column, and Numba for the
        tables."""
        from engine.reduce.hashed import numba

        dtypes = [schema[g] for g in groups]
        wide = (pl.Int128, pl.UInt128)   # no NumPy dtype: the group-by takes them
        codable = all(d == pl.String or (d.is_integer() and d not in wide) for d in dtypes)
        if numba is None or not groups or not codable:
            return False
        if cls.CODE in schema.names():
            return False
        return len(groups) > 1 or dtypes[0] == pl.String

    def encode(self, batch: pl.DataFrame) -> pl.DataFrame:
        """``batch`` with its key columns replaced by the one code column ``CODE``."""
        keys = batch.select(self.groups)
        if any(keys.null_count().row(0)):
            raise _CodesDecline
        codes, first = self._codes(keys)
        if first.size:
            self.keys = pl.concat([self.keys, keys[first]])
        return batch.drop(self.groups).with_columns(pl.Series(self.CODE, codes))

    def _codes(self, keys: pl.DataFrame):
        """Each row's code (rows,) int64 and the first row of each code new to the tables."""
        codes, first = self._column(keys, self.groups[0])
        for g, pairs in zip(self.groups[1:-1], self.pairs[:-1]):
            codes, first = pairs.pairs(codes, self._column(keys, g)[0])
        if len(self.groups) > 1:
            codes, first = self._last_column(keys, codes)
        return codes, first

    def _last_column(self, keys: pl.DataFrame, prefix):
        """The whole key's codes from the columns above (``prefix``) and the last one: the
        last column's own codes while it determines the rest (``Nesting``), else by the last
        table of pairs. When nesting first fails, that table is seeded with the keys seen so
        far in code order, so it gives them the codes they had."""
        import numpy as np

        last, first = self._column(keys, self.groups[-1])
        if self.nesting is not None and self.nesting.holds(prefix, last, first):
            return last, first
        if self.nesting is not None:
            seen = self.keys.height
            self.pairs[-1].pairs(self.nesting.parent[:seen], np.arange(seen, dtype=np.int64))
            self.nesting = None
        return self.pairs[-1].pairs(prefix, last)

    def _column(self, keys: pl.DataFrame, name: str):
        """One key column as 64-bit words: a string column's codes (and its new codes' first
        rows), an integer column's values."""
        import numpy as np

        if name in self.strings:
            return self.strings[name].strings(keys[name])
        return keys[name].to_numpy().astype(np.int64, copy=False), None

    def decode(self, table: pl.DataFrame) -> pl.DataFrame:
        """A cell table keyed by ``CODE``, sorted by (code, arm) → keyed by the key columns,
        sorted by (keys, arm): the codes' order by key is one sort of the distinct keys, and
        each code's one or two cells move together (a sort of the cells by string took 0.4 s
        at 2·10⁶ cells on machine A)."""
        import numpy as np

        code = table[self.CODE].to_numpy()
        if code.size and np.any(np.diff(code) < 0):   # not in code order: sort the cells themselves
            keyed = pl.concat([self.keys[table[self.CODE]], table.drop(self.CODE)], how="horizontal")
            return keyed.sort([*self.groups, "arm"])
        order, ordered = self._by_key()
        per_code = np.bincount(code, minlength=self.keys.height)   # each code's cells (0–2)
        cells = per_code[order]                                     # the same, in key order
        first = np.concatenate([[0], np.cumsum(per_code)[:-1]])
        taken = np.repeat(first[order], cells)
        taken += np.arange(taken.size) - np.repeat(np.cumsum(cells) - cells, cells)
        keys = ordered[np.repeat(np.arange(order.size), cells)]
        return pl.concat([keys, table[taken].drop(self.CODE)], how="horizontal")

    def _by_key(self):
        """(The codes in key order (keys,) int64, the keys in that order): the distinct keys
        sorted as one Series (a column, or a struct of the columns) and their codes looked up
        again. At 10⁶ keys on machine A: one string column 0.05 + 0.03 s, where a sort of the
        keys with their codes (``arg_sort``) took 0.21 s; two columns 0.13 s for the sort, where
        a frame sort took 0.24 s."""
        if len(self.groups) == 1:
            ordered = self.keys[self.groups[0]].sort().to_frame()
        else:
            ordered = self.keys.select(pl.struct(self.groups).alias(self.CODE)).to_series().sort().struct.unnest()
        return self._codes(ordered)[0], ordered


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
                  batch_rows: int = BATCH_ROWS, key_codes: bool = True) -> Cells:
    schema = rows.collect_schema()
    codes = _KeyCodes(groups, schema) if key_codes and _KeyCodes.applies(schema, groups) else None
    try:
        return _reduce_batches(rows, groups, outcome, covariates, batch_rows, codes)
    except _CodesDecline:
        return _reduce_batches(rows, groups, outcome, covariates, batch_rows, None)


def _reduce_batches(rows: pl.LazyFrame, groups, outcome: str, covariates, batch_rows: int, codes) -> Cells:
    keys = groups if codes is None else [codes.CODE]     # what the batches are keyed by
    merger = _TreeMerger(keys, covariates)
    empty, run = True, None
    for batch in _exact_batches(rows, batch_rows):
        empty = False
        if codes is not None:
            batch = codes.encode(batch)
        span = _dense_integer_span(batch, keys, outcome, covariates)
        if span is None:
            merger.push(_grouped_batch(batch, keys, outcome, covariates))
            del batch
            continue
        if run is None:
            run = _DenseRun(keys[0], batch.schema[keys[0]], covariates)
        elif not run.fits(span, batch.height):
            merger.push(run.table())
        run.add(batch, outcome, span)
        del batch   # before the next batch is read, not after: one batch in memory, not two
    if run is not None and run.state is not None:
        merger.push(run.table())
    if empty:
        table = reduce_batch(rows.head(0).collect(), groups, outcome, covariates)
    else:
        table = merger.result() if codes is None else codes.decode(merger.result())
    return Cells(table=table, levels=tuple(groups), covariates=tuple(covariates))
