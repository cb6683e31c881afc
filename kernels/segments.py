"""Rows → per-segment moments in one pass, and their pairwise merge.

A *segment* is a cell (leaf group × arm) numbered ``0 … num_segments - 1``.
For each segment the kernel keeps the count, the mean outcome, the centred
sum of squares M2 = Σ(y − ȳ)² and, with ``k`` covariates, the covariate
means, Σ(x − x̄)(y − ȳ) and Σ(x − x̄)(x − x̄)ᵀ: the sufficient statistics of
a Gaussian cell (DESIGN.md, "reduce").

How rows become moments
-----------------------
Each segment keeps a *shift*, a value of its own data (its first row seen),
and holds its means as ``shift + offset``. A block of rows is read once:
every row has its segment's shift subtracted before anything is summed, so
the sums Σd, Σd², Σd_x d_y, … are of deviations of the order of the data's
spread, never of its offset; for values within a factor two of the shift the
subtraction is even exact (Sterbenz), so data with mean 1e9 and sd 1 lose
nothing in float64. The block's sums become centred moments and join the
running state by the pairwise update of Chan, Golub & LeVeque (1979),
"Updating formulae and a pairwise algorithm for computing sample variances":

    n = nₐ + n_b,  δ = ȳ_b − ȳₐ,  ȳ = ȳₐ + δ·n_b/n,  M2 = M2ₐ + M2_b + δ²·nₐn_b/n

(and the same with δ_x δ_yᵀ for the cross moments), where δ is a difference
of offsets, small numbers, so it is not rounded at the scale of the offset.
``merge`` combines two partial states the same way (associative, with
``empty`` as identity), so blocks, devices and hosts combine in any grouping
with the same result up to rounding.

Fixed shapes
------------
``num_segments`` is static, and a block has a fixed number of rows: callers
cut the rows into blocks of ``block_rows_for(n)`` rows (a power of two), pad
the last one with masked rows (``iter_blocks``), and run one compiled
``accumulate`` per block, so a different row count never retraces. For arrays
already on a device, ``reduce_blocks`` scans over a whole ``(blocks × rows)``
array in one call. Nothing here calls ``jax.jit``: the caller compiles.

Precision
---------
float64 is the default and the reference. float32 on data with mean 1e9 and
sd 1 is *not* usable as given: float32 spaces numbers near 1e9 64 apart, so
the rows themselves have lost the signal before any sum (tested; the error in
M2 is of the order of the data, not of rounding). float32 is usable when the
caller first subtracts one global shift per column *in float64* (the JAX
reduce backend does, keeping the shift in float64 and adding it back to the
means). Measured on CPU with mean 1e9, sd 1, blocks of 2¹⁶ rows and 10⁵–10⁶
rows over 20–5000 cells: means within 5e-6·sd of the float64 reference and
M2 and the cross moments within 1e-5·n·sd² (the test asserts 2e-5·sd and
2e-4·n·sd²). That holds only while the values, after the global shift, span
at most a few thousand within-cell sds; otherwise use float64.

Example
-------
>>> import numpy as np, jax.numpy as jnp
>>> y = jnp.array([1.0, 2.0, 3.0, 10.0])
>>> x = jnp.zeros((4, 0))
>>> ids = jnp.array([0, 0, 1, 1])
>>> m = reduce_block(y, x, ids, jnp.ones(4, bool), num_segments=2)
>>> np.asarray(m.count).tolist(), np.asarray(m.mean).tolist(), np.asarray(m.m2).tolist()
([2, 2], [1.5, 6.5], [0.5, 24.5])
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Moments",
    "empty",
    "reduce_block",
    "merge",
    "accumulate",
    "reduce_blocks",
    "reduce_sums",
    "moments_from_sums",
    "block_rows_for",
    "iter_blocks",
    "bucket",
]


class Moments(NamedTuple):
    """Sufficient statistics per segment; ``k`` covariates (``k`` may be 0).

    Means are held as ``shift + offset``: ``shift`` is a value of the
    segment's own data (its first row seen) and ``offset`` is small, so every
    update subtracts numbers of the data's spread, never of its offset, and
    the mean is rounded once, when read (``mean``, ``x_mean``).
    """

    count: jax.Array   # (segments,) int32, or int64 with x64 — rows in the segment
    shift: jax.Array   # (segments, 1 + k) float — reference values: outcome, then covariates; 0 if empty
    offset: jax.Array  # (segments, 1 + k) float — means − shift; 0 if empty
    m2: jax.Array      # (segments,) float — Σ (y − ȳ)²
    xy_m2: jax.Array   # (segments, k) float — Σ (x − x̄)(y − ȳ)
    xx_m2: jax.Array   # (segments, k, k) float — Σ (x − x̄)(x − x̄)ᵀ, symmetric

    @property
    def mean(self) -> jax.Array:
        """(segments,) float — mean outcome; 0 for an empty segment."""
        return self.shift[:, 0] + self.offset[:, 0]

    @property
    def x_mean(self) -> jax.Array:
        """(segments, k) float — covariate means; 0 for an empty segment."""
        return self.shift[:, 1:] + self.offset[:, 1:]


def _count_dtype():
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def empty(num_segments: int, num_covariates: int = 0, dtype=jnp.float64) -> Moments:
    """The identity of ``merge``: every segment with no rows."""
    s, k = num_segments, num_covariates
    return Moments(count=jnp.zeros((s,), _count_dtype()), shift=jnp.zeros((s, 1 + k), dtype),
                   offset=jnp.zeros((s, 1 + k), dtype), m2=jnp.zeros((s,), dtype),
                   xy_m2=jnp.zeros((s, k), dtype), xx_m2=jnp.zeros((s, k, k), dtype))


def _first_per_segment(y, x, segment_ids, mask, num_segments, indices_are_sorted):
    """Each segment's first masked row in the block, (segments, 1 + k) (row 0 for an empty segment)."""
    rows = y.shape[0]
    order = jnp.where(mask, jnp.arange(rows, dtype=jnp.int32), rows)
    first = jax.ops.segment_min(order, segment_ids, num_segments, indices_are_sorted=indices_are_sorted)
    first = jnp.clip(first, 0, rows - 1)
    return jnp.stack([y[first], *(x[first, j].astype(y.dtype) for j in range(x.shape[1]))], axis=1)


def _combine(a: Moments, shift, delta, b_count, b_m2, b_xy_m2, b_xx_m2) -> Moments:
    """The pairwise update onto ``a``, given δ = b's means − a's means, relative to ``shift``.

    ``shift`` is a's where a has rows; δ is computed by the caller from
    offsets (small numbers), which is what keeps a 1e9 offset out of it.
    """
    dtype = a.m2.dtype
    n_a, n_b = a.count.astype(dtype), b_count.astype(dtype)
    weight_b = n_b / jnp.maximum(n_a + n_b, 1.0)   # share of b; 0 when both are empty
    cross = n_a * weight_b                          # n_a n_b / n
    delta_y, delta_x = delta[:, 0], delta[:, 1:]
    count = a.count + b_count
    # δ·(δ·c) rather than δ²·c: 0, not inf·0, when a segment is new and c = 0.
    return Moments(
        count=count,
        shift=jnp.where((count > 0)[:, None], shift, jnp.zeros((), dtype)),
        offset=a.offset + delta * weight_b[:, None],
        m2=a.m2 + b_m2 + delta_y * (delta_y * cross),
        xy_m2=a.xy_m2 + b_xy_m2 + delta_x * (delta_y * cross)[:, None],
        xx_m2=_symmetrise(a.xx_m2 + b_xx_m2 + delta_x[:, :, None] * (delta_x * cross[:, None])[:, None, :]),
    )


def _symmetrise(m):
    # The products above round differently in (i, j) and (j, i); keep the matrix exactly symmetric.
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _add_rows(state: Moments, y, x, segment_ids, mask, shift, indices_are_sorted) -> Moments:
    """One pass over a block: sums of deviations from ``shift``, merged into ``state``.

    ``shift`` must equal ``state.shift`` wherever the state has rows.
    """
    dtype = state.m2.dtype
    num_segments = state.count.shape[0]
    k = x.shape[1]
    zero = jnp.zeros((), dtype)

    def segment_sum(values):
        return jax.ops.segment_sum(values, segment_ids, num_segments, indices_are_sorted=indices_are_sorted)

    # Column by column: 1-D gathers and scatters are XLA's fast path on CPU.
    columns = [y, *(x[:, j].astype(dtype) for j in range(k))]
    d = [jnp.where(mask, c - jnp.take(shift[:, j], segment_ids, mode="clip"), zero)
         for j, c in enumerate(columns)]                                    # deviations, 0 on padding
    n = segment_sum(mask.astype(dtype))
    s_d = jnp.stack([segment_sum(dj) for dj in d], axis=1)                 # (segments, 1 + k): Σd
    s_dd = {(i, j): segment_sum(d[i] * d[j]) for i in range(1 + k) for j in range(i, 1 + k)}
    offset, centred, m2, xy_m2, xx_m2 = _centred(n, s_d, s_dd)
    # Padding rows are masked, so each block count is exact in float (≤ 2²⁴ rows in float32).
    count = jnp.round(n).astype(state.count.dtype)
    return _combine(state, shift, offset - state.offset, count, m2, xy_m2, xx_m2)


def _centred(n, s_d, s_dd):
    """Per segment, from the row count ``n``, Σd (segments, 1 + k) and Σdᵢdⱼ (``s_dd[i, j]``,
    i ≤ j) of deviations from a shift: the means − shift and the centred moments
    Σ(dᵢ − d̄ᵢ)(dⱼ − d̄ⱼ) = Σdᵢdⱼ − Σdᵢ·d̄ⱼ (``centred[i, j]``, i ≤ j), with M2 clamped at 0 and
    split into ``m2``, ``xy_m2`` and ``xx_m2`` (index 0 is the outcome)."""
    segments, k = s_d.shape[0], s_d.shape[1] - 1
    dtype = s_d.dtype
    zero = jnp.zeros((), dtype)
    inv_n = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0).astype(dtype)
    offset = s_d * inv_n[:, None]
    # One row has no spread: exactly 0, not the rounding of Σd² − (Σd)² when Σd² was summed
    # in another precision than Σd (the float32 atomic sums).
    centred = {(i, j): jnp.where(n > 1, s - s_d[:, i] * offset[:, j], zero) for (i, j), s in s_dd.items()}
    m2 = jnp.maximum(centred[0, 0], zero)
    xy_m2 = (jnp.stack([centred[0, j] for j in range(1, 1 + k)], axis=1) if k
             else jnp.zeros((segments, 0), dtype))
    xx_m2 = (jnp.stack([jnp.stack([centred[min(i, j), max(i, j)] for j in range(1, 1 + k)], axis=1)
                        for i in range(1, 1 + k)], axis=1) if k else jnp.zeros((segments, 0, 0), dtype))
    return offset, centred, m2, xy_m2, xx_m2


def reduce_block(y, x, segment_ids, mask, num_segments: int, *, shift=None,
                 indices_are_sorted: bool = False) -> Moments:
    """Moments of one block of rows, per segment, in one pass over the rows.

    Parameters
    ----------
    y : (rows,) float
        Outcome. Its dtype is the dtype of every float in the result.
    x : (rows, k) float
        Covariates (``k`` may be 0).
    segment_ids : (rows,) int
        Segment of each row, in ``[0, num_segments)``; any order. Ids outside
        the range (e.g. ``num_segments`` on padding rows) are dropped.
    mask : (rows,) bool
        False on padding rows: they count for nothing, whatever their values.
    num_segments : int
        Static number of segments.
    shift : optional, (1 + k,) or (num_segments, 1 + k) float
        Values subtracted before summing (outcome first, then covariates),
        e.g. a global shift. By default each segment's first row in the
        block, which keeps the sums at the scale of the data's spread
        whatever its offset.
    indices_are_sorted : bool
        Promise that ``segment_ids`` is non-decreasing (faster scatters).
    """
    state = empty(num_segments, x.shape[1], y.dtype)
    if shift is None:
        shift = _first_per_segment(y, x, segment_ids, mask, num_segments, indices_are_sorted)
    else:
        shift = jnp.broadcast_to(jnp.asarray(shift, y.dtype), state.shift.shape)
    return _add_rows(state, y, x, segment_ids, mask, shift, indices_are_sorted)


def merge(a: Moments, b: Moments) -> Moments:
    """Combine two partial results for the same segments (Chan, Golub & LeVeque 1979).

    Associative up to rounding, with ``empty`` as identity; exact in exact
    arithmetic. The result keeps a's shift (b's where a is empty); b's means
    are re-expressed on it as ``(shift_b − shift_a) + offset_b``, a
    difference of two data values, so a common offset cancels exactly.

    Example
    -------
    >>> import jax.numpy as jnp
    >>> ids, on = jnp.array([0, 0, 0]), jnp.ones(3, bool)
    >>> left = reduce_block(jnp.array([1.0, 2.0, 3.0]), jnp.zeros((3, 0)), ids, on, 1)
    >>> right = reduce_block(jnp.array([4.0, 5.0, 6.0]), jnp.zeros((3, 0)), ids, on, 1)
    >>> float(merge(left, right).m2[0])  # Σ(y − 3.5)² over 1…6
    17.5
    """
    seen = (a.count > 0)[:, None]
    shift = jnp.where(seen, a.shift, b.shift)
    delta = (b.shift - shift) + b.offset - a.offset
    return _combine(a, shift, delta, b.count, b.m2, b.xy_m2, b.xx_m2)


def accumulate(state: Moments, y, x, segment_ids, mask, *, indices_are_sorted: bool = False) -> Moments:
    """Add one block of rows to ``state``: the step to compile once per block shape.

    A segment already in ``state`` is centred on its shift; a new one on its
    first row in the block.
    """
    first = _first_per_segment(y, x, segment_ids, mask, state.count.shape[0], indices_are_sorted)
    shift = jnp.where((state.count > 0)[:, None], state.shift, first)
    return _add_rows(state, y, x, segment_ids, mask, shift, indices_are_sorted)


def reduce_blocks(y, x, segment_ids, mask, num_segments: int, block_rows: int, *,
                  indices_are_sorted: bool = False, state: Optional[Moments] = None) -> Moments:
    """Reduce rows already on a device, ``block_rows`` at a time, in one scan.

    The row count must be a multiple of ``block_rows`` (pad with masked rows);
    the number of blocks is a static shape, so callers that compile this
    should bucket it (or call ``accumulate`` per block instead).
    """
    rows = y.shape[0]
    if rows % block_rows:
        raise ValueError(f"rows ({rows}) must be a multiple of block_rows ({block_rows}); pad with masked rows")
    blocks = rows // block_rows
    k = x.shape[1]
    if state is None:
        state = empty(num_segments, k, y.dtype)
    stacked = (y.reshape(blocks, block_rows), x.reshape(blocks, block_rows, k),
               segment_ids.reshape(blocks, block_rows), mask.reshape(blocks, block_rows))

    def step(carry, block):
        return accumulate(carry, *block, indices_are_sorted=indices_are_sorted), None

    return jax.lax.scan(step, state, stacked)[0]


def reduce_sums(y, x, segment_ids, mask, num_segments: int, shift, *, accumulate_dtype=None,
                fused: bool = True, scatter: str = "xla") -> tuple[Moments, jax.Array]:
    """Moments of all the rows in one read and one scatter of raw sums about a fixed shift.

    For accelerators, where ``reduce_blocks``' per-block first-row search, three scatters and
    merge cost several passes a block. Each row's ``d = (y, x) − shift`` (``shift`` (1 + k,), one per
    column, e.g. the global shift a float32 caller has already subtracted in float64, or
    (segments, 1 + k), one per segment, e.g. a running state's shifts) is
    turned into ``(1, d, d dᵀ)`` and added per segment in ``accumulate_dtype`` (float64 when
    x64 is on: rows stay float32 in memory, only the sums are wide). Then
    ``M2 = Σd² − (Σd)²/n`` per segment. That subtraction amplifies the accumulator's
    rounding by ``cancellation = 1 + n·(d̄)²/M2`` (1 when a segment's mean equals the shift;
    the largest over the outcome and the covariates):
    the relative error of M2 is at most ~``n·ε·cancellation``, typically ``√n·ε·cancellation``
    (ε = 1.1e-16 in float64). The second result is that factor per segment, so a caller can
    fall back to ``reduce_blocks`` (shifts per segment) where it is large.

    ``fused``: one scatter of a (rows, columns) matrix; else one 1-D scatter per column.
    ``scatter="atomic"``: the sums come from ``atomic_sums.segment_sums`` instead, a Pallas
    kernel for NVIDIA GPUs (float32 or float64 rows, no covariates, one shift for all rows): float32
    partials, one vector atomic a row; a segment whose partial count may have lost increments
    gets an infinite cancellation, so the caller falls back as for any other.
    Returns ``(Moments, cancellation)``; ``merge`` combines the result with any other.
    """
    acc = accumulate_dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    k = x.shape[1]
    shift = jnp.asarray(shift, y.dtype)
    if shift.ndim == 2:     # per segment: each row minus its segment's shift (a gather)
        row_shift = jnp.take(shift, segment_ids, axis=0, mode="clip")
    else:
        shift = row_shift = jnp.broadcast_to(shift, (1 + k,))
    upper_i, upper_j = np.triu_indices(1 + k)
    if scatter == "atomic":
        if k or shift.ndim == 2:
            raise ValueError("scatter='atomic' sums the outcome alone about one shift: no covariates, "
                             "no per-segment shifts")
        from kernels import atomic_sums
        sums, count, largest, _ = atomic_sums.segment_sums(y, segment_ids, mask, num_segments, shift[0])
        return moments_from_sums(sums.astype(acc), count, shift, exact=largest < atomic_sums.EXACT_COUNT)
    if scatter != "xla":
        raise ValueError(f"scatter must be 'xla' or 'atomic', got {scatter!r}")
    d = jnp.concatenate([y[:, None], x.astype(y.dtype)], axis=1) - row_shift
    d = jnp.where(mask[:, None], d, jnp.zeros((), d.dtype)).astype(acc)
    columns = jnp.concatenate([mask.astype(acc)[:, None], d, d[:, upper_i] * d[:, upper_j]], axis=1)
    if fused:
        sums = jax.ops.segment_sum(columns, segment_ids, num_segments)
    else:
        sums = jnp.stack([jax.ops.segment_sum(columns[:, c], segment_ids, num_segments)
                          for c in range(columns.shape[1])], axis=1)
    if jnp.finfo(acc).nmant < 52:   # float32 sums are exact counts only to 2²⁴: count in integers
        count = jax.ops.segment_sum(mask.astype(_count_dtype()), segment_ids, num_segments)
    else:
        count = jnp.round(sums[:, 0]).astype(_count_dtype())
    return moments_from_sums(sums, count, shift)


def moments_from_sums(sums, count, shift, *, exact=None) -> tuple[Moments, jax.Array]:
    """Moments and the cancellation factor from raw sums about ``shift``.

    ``sums`` (segments, 1 + (1 + k) + (1 + k)(2 + k)/2): per segment Σ1, Σd (outcome, then the
    k covariates) and Σdᵢdⱼ for i ≤ j in ``np.triu_indices`` order; ``count`` (segments,) int;
    ``shift`` (1 + k,) or (segments, 1 + k). ``exact`` (segments,) bool, optional: False where
    the sums may have lost rows (their cancellation is then infinite). See ``reduce_sums``.
    """
    acc = sums.dtype
    k = int(round((np.sqrt(8 * sums.shape[1] + 1) - 5) / 2))   # columns = 2 + k + (1+k)(2+k)/2
    upper_i, upper_j = np.triu_indices(1 + k)
    if sums.shape[1] != 2 + k + upper_i.size:
        raise ValueError(f"sums has {sums.shape[1]} columns: not Σ1, Σd and Σdᵢdⱼ for any covariate count")
    n = sums[:, 0]
    s_dd = {(int(i), int(j)): sums[:, 2 + k + c] for c, (i, j) in enumerate(zip(upper_i, upper_j))}
    offset, centred, m2, xy_m2, xx_m2 = _centred(n, sums[:, 1:2 + k], s_dd)
    zero = jnp.zeros((), acc)
    if k:
        diagonal = jnp.arange(k)
        xx_m2 = xx_m2.at[:, diagonal, diagonal].max(zero)
    seen = (n > 0)[:, None]
    moments = Moments(count=count.astype(_count_dtype()),
                      shift=jnp.where(seen, jnp.broadcast_to(jnp.asarray(shift).astype(acc), offset.shape), zero),
                      offset=offset, m2=m2, xy_m2=xy_m2, xx_m2=xx_m2)
    # Per column (outcome and covariates) Σd²/M2; the cross moments are bounded by these.
    # A column whose M2 came out ≤ 0 although its rows are not all at the shift (n ≥ 2, Σd² > 0)
    # cancelled completely: infinite, so a caller falls back.
    ratios = []
    for i in range(1 + k):
        centred_ii, square = jnp.maximum(centred[i, i], zero), s_dd[i, i]
        lost = (centred_ii <= 0) & (square > 0) & (n > 1)
        ratios.append(jnp.where(centred_ii > 0, square / jnp.where(centred_ii > 0, centred_ii, 1.0),
                                jnp.where(lost, jnp.inf, 1.0)))
    cancellation = jnp.max(jnp.stack(ratios), axis=0)
    if exact is not None:
        cancellation = jnp.where(exact, cancellation, jnp.inf)
    return moments, cancellation


# --- host-side helpers for fixed shapes (NumPy only) --------------------------


def bucket(size: int, minimum: int = 1) -> int:
    """The next power of two ≥ ``max(size, minimum)``: sizes that share a bucket share a compile."""
    return 1 << max(int(max(size, minimum)) - 1, 0).bit_length()


def block_rows_for(num_rows: int, max_block_rows: int = 1 << 20, min_block_rows: int = 1 << 10) -> int:
    """Rows per block: a power of two, at least ``min_block_rows``, at most ``max_block_rows``."""
    return min(bucket(num_rows, min_block_rows), bucket(max_block_rows))


def iter_blocks(y: np.ndarray, x: np.ndarray, segment_ids: np.ndarray, block_rows: int,
                pad_segment: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(y, x, segment_ids, mask)`` blocks of exactly ``block_rows`` rows, in row order.

    The last block is padded with zeros, segment ``pad_segment`` (pass
    ``num_segments`` to keep sorted ids sorted) and ``mask`` False.
    """
    rows = y.shape[0]
    for start in range(0, max(rows, 1), block_rows):
        stop = min(start + block_rows, rows)
        size = stop - start
        if size == block_rows:
            yield y[start:stop], x[start:stop], segment_ids[start:stop], np.ones(block_rows, bool)
            continue
        pad = block_rows - size
        yield (np.concatenate([y[start:stop], np.zeros(pad, y.dtype)]),
               np.concatenate([x[start:stop], np.zeros((pad, x.shape[1]), x.dtype)]),
               np.concatenate([segment_ids[start:stop], np.full(pad, pad_segment, segment_ids.dtype)]),
               np.arange(block_rows) < size)
