"""Rows → cells with the JAX segment kernel (``kernels.segments``), on the default device.

The validated rows are collected once (only the columns the fit uses). Group
keys become dense codes with Polars — the distinct keys, sorted, numbered, and
joined back onto the rows — so millions of distinct string or integer keys
cost a hash join, never a Python loop. A cell's segment is
``2 · code + arm``; segments are numbered in the order of the cell table
(keys, then arm), so the kernel's output maps onto the table without a sort.

The rows then go through the device in blocks of a fixed, power-of-two size,
each one ``accumulate`` step compiled once per (block size, segment bucket,
covariate count, precision): a different row count or a few more groups
reuse the compiled step (``TRACES`` counts compilations, for tests).

Precision: float64 by default (on every platform; the reduction runs inside
``jax.enable_x64``). ``precision="float32"`` subtracts each column's mean in
float64 on the host first and adds it back to the means afterwards; see
``kernels.segments`` for what float32 achieves and when it does not apply.
"""
from __future__ import annotations

import collections
import functools

import numpy as np
import polars as pl

from engine.cells import Cells, stat_columns

#: Rows per block at most (powers of two); smaller inputs use a smaller bucket. On CPU, blocks
#: of 2¹⁸ rows keep the per-block temporaries small (XLA's CPU scatters slow down ~5× when the
#: temporaries of a 2²⁰-row block spill), but a block is never smaller than the segment count,
#: so the per-block merge (O(segments)) stays amortised.
CPU_BLOCK_ROWS = 1 << 18
BLOCK_ROWS = 1 << 22
#: Segments are padded to a power of two at least this large.
MIN_SEGMENTS = 64
#: How many times the block step has been traced (compiled), by name.
TRACES: collections.Counter = collections.Counter()


def _step(state, y, x, segment_ids, mask, *, indices_are_sorted):
    from kernels import segments

    TRACES["accumulate"] += 1  # runs once per trace, never per call
    return segments.accumulate(state, y, x, segment_ids, mask, indices_are_sorted=indices_are_sorted)


@functools.lru_cache(maxsize=None)
def _compiled_step():
    import jax

    # CPU buffers cannot be donated (XLA warns); elsewhere the state is updated in place.
    donate = (0,) if jax.default_backend() != "cpu" else ()
    return jax.jit(_step, static_argnames="indices_are_sorted", donate_argnums=donate)


def encode_cells(frame: pl.DataFrame, groups) -> tuple[pl.DataFrame, np.ndarray]:
    """Leaf keys in table order, and each row's segment ``2 · code + arm`` (int64).

    The keys are the distinct ones, or, for one integer column spanning at most twice the
    rows, every integer of its range (a key with no rows is an empty segment)."""
    groups = list(groups)
    arm = frame["arm"].cast(pl.Int64).to_numpy()
    if not groups:
        return pl.DataFrame(), arm
    from engine.reduce.polars import dense_key_span, key_offsets, keys_at

    span = dense_key_span(frame, groups)
    if span is not None:
        # A narrow integer range (the polars backend's dense route): the code is the key minus
        # the lowest, no hash join; absent keys are empty segments, dropped afterwards.
        group, dtype = groups[0], frame.schema[groups[0]]
        keys = keys_at(np.arange(span[1]), span[0], dtype).alias(group).to_frame()
        codes = frame.select(key_offsets(group, dtype, span[0]))[group].to_numpy()
        return keys, 2 * codes + arm
    keys = frame.select(groups).unique().sort(groups).with_row_index("_code")
    codes = (frame.select(groups).join(keys, on=groups, how="left", maintain_order="left")["_code"]
             .cast(pl.Int64).to_numpy())
    return keys.drop("_code"), 2 * codes + arm


def reduce_arrays(y: np.ndarray, x: np.ndarray, segment_ids: np.ndarray, num_segments: int, *,
                  block_rows: int | None = None, precision: str = "float64",
                  indices_are_sorted: bool = False):
    """Run the kernel over host arrays; return the moments as NumPy arrays (float64).

    ``y`` (rows,), ``x`` (rows, k), ``segment_ids`` (rows,) in ``[0, num_segments)``.
    Returns ``count, mean, m2, x_mean, xy_m2, xx_m2`` for ``bucket(num_segments)``
    segments (the padding segments are empty).
    """
    import jax

    from kernels import segments

    if precision not in ("float64", "float32"):
        raise ValueError(f"precision {precision!r}: expected 'float64' or 'float32'")
    rows = y.shape[0]
    padded_segments = segments.bucket(num_segments, MIN_SEGMENTS)
    if block_rows is None:
        target = CPU_BLOCK_ROWS if jax.default_backend() == "cpu" else BLOCK_ROWS
        block_rows = segments.block_rows_for(rows, max_block_rows=min(max(target, padded_segments), BLOCK_ROWS))
    ids = segment_ids.astype(np.int32 if padded_segments < 2**31 - 1 else np.int64)
    if precision == "float32":
        # A float32 row near 1e9 has lost its spread already; centre in float64 first.
        centre_y = float(y.mean()) if rows else 0.0
        centre_x = x.mean(axis=0) if rows else np.zeros(x.shape[1])
        y, x = (y - centre_y).astype(np.float32), (x - centre_x).astype(np.float32)
    else:
        centre_y, centre_x = 0.0, np.zeros(x.shape[1])
    with jax.enable_x64(True):
        step = _compiled_step()
        state = segments.empty(padded_segments, x.shape[1], jax.numpy.dtype(precision))
        for block in segments.iter_blocks(y, x, ids, block_rows, padded_segments):
            state = step(state, *block, indices_are_sorted=indices_are_sorted)
        count = np.asarray(state.count)
        mean = np.asarray(state.mean, np.float64) + centre_y
        x_mean = np.asarray(state.x_mean, np.float64) + centre_x
        return (count, mean, np.asarray(state.m2, np.float64), x_mean,
                np.asarray(state.xy_m2, np.float64), np.asarray(state.xx_m2, np.float64))


def reduce_jax(rows: pl.LazyFrame, groups, outcome: str, covariates, *, block_rows: int | None = None,
               precision: str = "float64") -> Cells:
    """Rows (with ``arm``) → cells, the same table as ``reduce_polars`` up to rounding."""
    groups, covariates = list(groups), list(covariates)
    frame = rows.select([*groups, "arm", pl.col(outcome).cast(pl.Float64),
                         *[pl.col(c).cast(pl.Float64) for c in covariates]]).collect()
    keys, segment_ids = encode_cells(frame, groups)
    num_segments = 2 * max(keys.height, 1)
    y = frame[outcome].to_numpy()
    x = (frame.select(covariates).to_numpy(order="c") if covariates
         else np.zeros((frame.height, 0), np.float64))
    count, mean, m2, x_mean, xy_m2, xx_m2 = reduce_arrays(
        y, x, segment_ids, num_segments, block_rows=block_rows, precision=precision)
    present = np.flatnonzero(count[:num_segments] > 0)   # ascending: keys, then arm
    table = stat_columns(present, count, mean, m2, x_mean, xy_m2, xx_m2, covariates)
    if groups:
        table = pl.concat([keys[present // 2], table], how="horizontal")
    return Cells(table=table, levels=tuple(groups), covariates=tuple(covariates))
