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

Rows that are already JAX arrays on a device (the backend above copies host rows
in, bounded by the host → device link) go through ``reduce_device``: the block
scan on the device, or on an NVIDIA GPU in float32 the Pallas atomic kernel
``kernels.atomic_sums`` with a float64 pass over the cells it cannot settle.
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
        return tuple(_host_moments(state, centre_y, centre_x))


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


# --- arrays already on a device ---------------------------------------------------------------

#: A cell whose M2 from the float32 atomic kernel may be off by more than this, relatively
#: (√(its largest float32 partial's rows) · 2⁻²⁴ · its cancellation factor, the typical error;
#: ``kernels.segments.reduce_sums``), is reduced again in float64. The float32 route promises
#: M2 within 2e-4·n·sd² (``kernels.segments``); this keeps a margin of 20.
REFINE_ERROR = 1e-5
#: Rows whose mean shifts the rows for the atomic kernel (evenly spaced; no pass over all).
CENTRE_SAMPLE = 4096


def _gpu(array) -> bool:
    devices = getattr(array, "devices", None)
    platforms = {d.platform for d in devices()} if devices else set()
    return bool(platforms) and platforms <= {"gpu", "cuda"}


@functools.lru_cache(maxsize=None)
def _device_programs():
    import jax
    import jax.numpy as jnp

    from kernels import segments

    def centred(y, x, mask, precision):
        """Float64 means of the masked rows, and the rows about them in ``precision``."""
        weight = mask.astype(jnp.float64)
        total = jnp.maximum(jnp.sum(weight), 1.0)
        centre_y = jnp.sum(y.astype(jnp.float64) * weight) / total
        centre_x = jnp.sum(x.astype(jnp.float64) * weight[:, None], axis=0) / total
        return (centre_y, centre_x, (y.astype(jnp.float64) - centre_y).astype(precision),
                (x.astype(jnp.float64) - centre_x).astype(precision))

    def inputs(y, x, ids, mask):
        """The caller's arrays as the programs read them, converted inside the program: an
        eager op on the rows costs a dispatch a call, and on an H100 the first eager
        ``jnp.zeros((rows, 0))`` of each row count compiled for ~20 s (session 14). Ids past
        the int32 range become −1 (out of range, so refused), not wrapped into a segment."""
        if jnp.iinfo(ids.dtype).max > 2**31 - 1 or jnp.iinfo(ids.dtype).min < -2**31:
            past = ids > 2**31 - 1
            if jnp.iinfo(ids.dtype).min < 0:
                past = past | (ids < -2**31)
            ids = jnp.where(past, -1, jnp.where(past, 0, ids).astype(jnp.int32))
        ids = ids.astype(jnp.int32)
        mask = jnp.ones(y.shape, bool) if mask is None else mask.astype(bool)
        x = jnp.zeros((y.shape[0], 0), y.dtype) if x is None else x
        return x, ids, mask

    def blocks(y, x, ids, mask, *, segments_, block_rows, precision):
        TRACES["device-blocks"] += 1
        x, ids, mask = inputs(y, x, ids, mask)
        if precision == "float32":
            centre_y, centre_x, y, x = centred(y, x, mask, jnp.float32)
        else:
            centre_y, centre_x = jnp.zeros((), jnp.float64), jnp.zeros(x.shape[1], jnp.float64)
            y, x = y.astype(jnp.float64), x.astype(jnp.float64)
        pad = -y.shape[0] % block_rows   # masked rows up to whole blocks
        state = segments.reduce_blocks(jnp.pad(y, (0, pad)), jnp.pad(x, ((0, pad), (0, 0))),
                                       jnp.pad(ids, (0, pad), constant_values=segments_),
                                       jnp.pad(mask, (0, pad)), segments_, block_rows)
        return _packed(state, centre_y, centre_x)

    def sampled_centre(y, mask):
        """The float64 mean of the kept rows among ``CENTRE_SAMPLE`` evenly spaced ones (of all
        the kept rows where none of those is kept): a shift near the rows, without a pass."""
        stride = max(y.shape[0] // CENTRE_SAMPLE, 1)
        sample = y[::stride][:CENTRE_SAMPLE].astype(jnp.float64)
        weight = mask[::stride][:CENTRE_SAMPLE].astype(jnp.float64)
        return jax.lax.cond(jnp.sum(weight) > 0,
                            lambda: jnp.sum(sample * weight) / jnp.sum(weight),
                            lambda: centred(y, jnp.zeros((y.shape[0], 0), y.dtype), mask, jnp.float32)[0])

    def atomic(y, ids, mask, num_segments, *, segments_):
        from kernels import atomic_sums   # Pallas: imported only where the kernel runs

        TRACES["device-atomic"] += 1
        _, ids, mask = inputs(y, None, ids, mask)
        if y.dtype not in (jnp.float32, jnp.float64):   # the kernel reads these two
            narrow = jnp.issubdtype(y.dtype, jnp.floating) and y.dtype.itemsize < 4
            y = y.astype(jnp.float32 if narrow else jnp.float64)
        # The kernel subtracts a shift near the rows in their own precision (float32 rows: exact
        # within a factor of two of it; float64 rows: each difference rounded to float32 once),
        # so the rows are read once, with no pass to centre or convert them first.
        shift = sampled_centre(y, mask).astype(y.dtype)
        centre_y = shift.astype(jnp.float64)
        sums, count, largest, dropped = atomic_sums.segment_sums(y, ids, mask, segments_, shift)
        state, cancellation = segments.moments_from_sums(
            sums, count, jnp.zeros((1,), jnp.float64), exact=largest < atomic_sums.EXACT_COUNT)
        error = cancellation * jnp.sqrt(jnp.maximum(largest, 1).astype(jnp.float64)) * 2.0 ** -24
        refine = (state.count > 1) & ~(error <= REFINE_ERROR)
        # Ids in the padding past ``num_segments`` are as wrong as those the kernel dropped.
        dropped = dropped + jnp.sum(jnp.where(jnp.arange(segments_) >= num_segments, count, 0))
        tallies = jnp.stack([jnp.sum(refine), dropped]).astype(jnp.float64)
        return jnp.concatenate([tallies, _packed(state, centre_y, jnp.zeros(0))]), refine

    def refined(y, ids, mask, refine, *, size, segments_):
        """The rows of the ``refine`` cells, gathered to ``size`` rows (≥ their number), reduced
        in float64 in one block about each cell's first row (Sterbenz-exact differences). Few
        rows by construction, so one block: the block scan over all the rows merged its state of
        every segment once per block (1.6 s at 10⁷ groups, 1e8 rows on the H100, session 14)."""
        TRACES["device-refined"] += 1
        _, ids, mask = inputs(y, None, ids, mask)
        keep = mask & refine[jnp.clip(ids, 0, refine.shape[0] - 1)]
        kept = jnp.sum(keep)
        (index,) = jnp.nonzero(keep, size=size, fill_value=0)
        valid = jnp.arange(size) < kept
        gathered = (y[index].astype(jnp.float64), jnp.zeros((size, 0), jnp.float64),
                    jnp.where(valid, ids[index], segments_), valid)
        if size <= BLOCK_ROWS:
            state = segments.reduce_block(*gathered, segments_)
        else:   # many cells' rows (size, a power of two, is a multiple of BLOCK_ROWS): bounded memory
            state = segments.reduce_blocks(*gathered, segments_, BLOCK_ROWS)
        return jnp.concatenate([kept.astype(jnp.float64)[None],
                                _packed(state, jnp.zeros((), jnp.float64), jnp.zeros(0, jnp.float64))])

    def id_range(ids, mask):
        """The least and the largest id of the kept rows (0, 0 where none is kept), in the ids'
        own type (an int64 id past the int32 range is named as it is)."""
        mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        return jnp.stack([jnp.min(jnp.where(mask, ids, 0)), jnp.max(jnp.where(mask, ids, 0))])

    return (jax.jit(blocks, static_argnames=("segments_", "block_rows", "precision")),
            jax.jit(atomic, static_argnames=("segments_",)), jax.jit(id_range),
            jax.jit(refined, static_argnames=("size", "segments_")))


def _packed(state, centre_y, centre_x):
    """A kernel state as one float64 array (count, mean, M2, x̄, Σxy, Σxx, each flattened), the
    centres added back to the means (0 for an empty segment, as the float64 route gives): one
    copy to the host instead of six (each ~0.4–0.6 ms on an H100, whatever its size)."""
    import jax.numpy as jnp

    seen = state.count > 0
    mean = jnp.where(seen, state.mean.astype(jnp.float64) + centre_y, 0.0)
    x_mean = jnp.where(seen[:, None], state.x_mean.astype(jnp.float64) + centre_x, 0.0)
    return jnp.concatenate([state.count.astype(jnp.float64), mean, state.m2.astype(jnp.float64),
                            x_mean.ravel(), state.xy_m2.astype(jnp.float64).ravel(),
                            state.xx_m2.astype(jnp.float64).ravel()])


@functools.lru_cache(maxsize=None)
def _pack_program():
    import jax

    return jax.jit(_packed)


def _host_moments(state, centre_y, centre_x) -> list[np.ndarray]:
    """A kernel state on the host: ``count, mean, m2, x_mean, xy_m2, xx_m2`` (x64 must be on)."""
    import jax.numpy as jnp

    flat = _pack_program()(state, jnp.asarray(centre_y, jnp.float64), jnp.asarray(centre_x, jnp.float64))
    return _unpacked(np.asarray(flat), state.count.shape[0], state.xy_m2.shape[1])


def _unpacked(flat: np.ndarray, segments_: int, k: int) -> list[np.ndarray]:
    """``_packed``'s array on the host → ``count, mean, m2, x_mean, xy_m2, xx_m2``."""
    s = segments_
    ends = np.cumsum([s, s, s, s * k, s * k, s * k * k])
    count, mean, m2, x_mean, xy_m2, xx_m2 = np.split(flat, ends[:-1])
    return [count.astype(np.int64), mean, m2, x_mean.reshape(s, k), xy_m2.reshape(s, k),
            xx_m2.reshape(s, k, k)]


def reduce_device(y, x, segment_ids, num_segments: int, *, mask=None, precision: str = "float64",
                  method: str = "auto"):
    """Rows already in JAX arrays (on a GPU, or any device) → per-segment moments, on that device.

    ``y`` (rows,), ``x`` (rows, k) or None, ``segment_ids`` (rows,) int in ``[0, num_segments)``
    where the mask keeps the row (others are ignored), ``mask`` (rows,) bool (default all rows).
    Returns ``(moments, info)``: ``moments`` the tuple
    ``count, mean, m2, x_mean, xy_m2, xx_m2`` of ``reduce_arrays`` (NumPy, float64, for
    ``bucket(num_segments)`` segments); ``info`` says which ``method`` ran and how many cells
    were ``refined``.

    ``method``: ``"blocks"``, the block scan of ``kernels.segments`` (every precision, any device,
    covariates); ``"atomic"``, the Pallas kernel ``kernels.atomic_sums`` (NVIDIA GPU,
    ``precision="float32"``, no covariates; float32 or float64 rows, float32 sums): 5–70× the
    block scan and 1.5–9× XLA's scatter on an H100 at 1e8 rows (benchmarks/RESULTS.md, sessions
    9 and 14). Cells whose float32 M2 may be off by more than
    ``REFINE_ERROR`` are reduced again in float64 over their own rows, gathered first (only
    when there are any: typically cells of a few nearly equal values), and so are cells whose
    float32 partial count may have lost rows (their counts come from the rows then). A cell of
    one row has no M2 to refine: its mean carries the float32 rounding of its distance from the
    shift, as on the block scan's float32 route. Rows of other types (integers, float16) are
    converted in the program; ids past the int32 range are refused, not wrapped.
    ``"auto"`` (default): atomic where it applies, else blocks. ``precision="float32"`` subtracts
    the masked rows' float64 mean first (``kernels.segments``: float32 at an offset of 1e9 has no
    spread left otherwise) and adds it back to the means; rows going to the atomic kernel are
    read once instead, float32 or float64 as they are: the kernel subtracts the mean of
    ``CENTRE_SAMPLE`` evenly spaced kept rows in the rows' precision (a shift near the rows is
    all the sums need; cells far from it are refined).

    Bad ids raise ``SpecError`` naming one. The atomic kernel counts them in its own pass (no
    pass of its own for the check; nothing is returned when it finds any); the block scan checks
    the ids' range first.
    """
    import jax
    import jax.numpy as jnp

    from engine.errors import SpecError
    from kernels import segments

    if precision not in ("float64", "float32"):
        raise SpecError(f"precision {precision!r}: expected 'float64' or 'float32'")
    if method not in ("auto", "blocks", "atomic"):
        raise SpecError(f"method {method!r}: expected 'auto', 'blocks' or 'atomic'")
    rows = int(np.shape(y)[0]) if np.ndim(y) == 1 else None
    if rows is None:
        raise SpecError(f"y has shape {np.shape(y)}: expected one value a row, (rows,)")
    k = 0 if x is None else int(np.shape(x)[1]) if np.ndim(x) == 2 else -1
    if k < 0 or (x is not None and np.shape(x)[0] != rows):
        raise SpecError(f"x has shape {np.shape(x)}: expected (rows, covariates) with {rows} rows, or None")
    for name, value in (("segment_ids", segment_ids), ("mask", mask)):
        if value is not None and tuple(np.shape(value)) != (rows,):
            raise SpecError(f"{name} has shape {np.shape(value)}: expected ({rows},), one per row of y")
    # A Polars or pandas Series has a dtype of its own, not NumPy's: read theirs through NumPy.
    id_dtype = segment_ids.dtype if isinstance(segment_ids, (np.ndarray, jax.Array)) else np.asarray(segment_ids).dtype
    if not jnp.issubdtype(id_dtype, jnp.integer):
        raise SpecError(f"segment_ids has dtype {id_dtype}: expected integers "
                        f"in [0, {num_segments})")
    if num_segments < 1 or num_segments > 2**31 - 2:
        raise SpecError(f"num_segments {num_segments}: expected 1 to 2³¹ − 2")
    atomic_applies = precision == "float32" and k == 0 and _gpu(y)
    if method == "atomic" and atomic_applies and not rows:
        method = "blocks"   # nothing to add: the block scan returns the empty moments
    if method == "atomic" and not atomic_applies:
        raise SpecError("method 'atomic' needs float32 precision, no covariates and y on an NVIDIA GPU; "
                        "use method='blocks' (or 'auto')")
    chosen = "atomic" if method == "atomic" or (method == "auto" and atomic_applies and rows) else "blocks"
    padded = segments.bucket(num_segments, MIN_SEGMENTS)
    blocks, atomic, id_range, refined_program = _device_programs()

    def check_ids():
        low, high = (int(v) for v in np.asarray(id_range(ids, mask)))
        if low < 0 or high >= num_segments:
            bad = low if low < 0 else high
            raise SpecError(f"segment_ids holds {bad}: expected ids in [0, {num_segments}) where the mask "
                            f"keeps the row; raise num_segments or fix the ids")

    with jax.enable_x64(True):
        # As given: the programs convert them (``inputs``), so no eager op runs on the rows.
        y, ids = jnp.asarray(y), jnp.asarray(segment_ids)
        mask, x = (None if a is None else jnp.asarray(a) for a in (mask, x))
        target = CPU_BLOCK_ROWS if jax.default_backend() == "cpu" else BLOCK_ROWS
        block_rows = segments.block_rows_for(rows, max_block_rows=min(max(target, padded), BLOCK_ROWS))
        if chosen == "blocks":
            if rows:
                check_ids()
            flat = blocks(y, x, ids, mask, segments_=padded, block_rows=block_rows, precision=precision)
            return tuple(_unpacked(np.asarray(flat), padded, k)), {"method": "blocks", "refined": 0}
        flat, refine = atomic(y, ids, mask, num_segments, segments_=padded)
        flat = np.asarray(flat)   # the one wait for the device, and the one copy
        refined, dropped = int(flat[0]), int(flat[1])
        if dropped:   # the kernel's pass was the check: name a bad id (nothing was returned)
            check_ids()
            raise SpecError(f"segment_ids: {dropped} kept row(s) with an id outside [0, {num_segments})")
        moments = _unpacked(flat[2:], padded, 0)
        if refined:
            # Those cells' rows again, gathered, in float64 about each cell's first row.
            chosen_cells = np.asarray(refine)
            size = segments.bucket(int(moments[0][chosen_cells].sum()), 1024)
            again = np.asarray(refined_program(y, ids, mask, refine, size=size, segments_=padded))
            if again[0] > size:   # a count that lost increments (≥ 2²⁴ rows in one partial)
                size = segments.bucket(int(again[0]), 1024)
                again = np.asarray(refined_program(y, ids, mask, refine, size=size, segments_=padded))
            better = _unpacked(again[1:], padded, 0)
            for i in (0, 1, 2):   # the count too: a partial count of 2²⁴ rows may have lost some
                moments[i] = np.where(chosen_cells, better[i], moments[i])
        return tuple(moments), {"method": "atomic", "refined": refined}
