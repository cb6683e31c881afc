"""engine.reduce.jax.reduce_device: rows already in JAX arrays → per-segment moments.

The atomic method runs its Pallas kernel through the interpreter here (no GPU): every program of
BLOCK rows holds distinct ids (the interpreter's atomics are not atomic; see
tests/unit/test_atomic_sums.py), which is enough to check the float64 refinement of the cells
whose float32 M2 cannot be trusted.
"""
from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.errors import SpecError
from engine.reduce import jax as jax_backend
from kernels import atomic_sums

BLOCK = 256


def on_device(*arrays):
    with jax.enable_x64(True):
        return [None if a is None else jnp.asarray(a) for a in arrays]


def rows(seed, n, segments, k=0, offset=0.0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, segments, n)
    y = offset + rng.normal(size=n) + 0.2 * (ids % 7)
    x = rng.normal(size=(n, k))
    return y, x, ids


def assert_float32_tolerances(got, want, seen):
    """kernels/segments.py's float32 tolerances over the cells ``seen``: means within 2e-5·sd,
    M2 within 2e-4·n·sd² of the float64 reference ``want``."""
    sd = np.sqrt(want[2][seen] / want[0][seen])
    assert np.max(np.abs(got[1][seen] - want[1][seen]) / sd) < 2e-5
    assert np.max(np.abs(got[2][seen] - want[2][seen]) / (want[0][seen] * sd**2)) < 2e-4


def test_blocks_match_reduce_arrays():
    y, x, ids = rows(0, 5000, 300, k=2)
    got, info = jax_backend.reduce_device(*on_device(y, x, ids), 300)
    want = jax_backend.reduce_arrays(y, x, ids, 300)
    assert info == {"method": "blocks", "refined": 0}
    np.testing.assert_array_equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-9)


def test_float32_blocks_at_an_offset_of_1e9():
    y, _, ids = rows(1, 20000, 50, offset=1e9)
    got, _ = jax_backend.reduce_device(*on_device(y, None, ids), 50, precision="float32")
    want = jax_backend.reduce_arrays(y, np.zeros((y.size, 0)), ids, 50)
    seen = want[0] > 0
    assert_float32_tolerances(got, want, seen)


def test_mask_drops_rows():
    y, _, ids = rows(2, 3000, 40)
    mask = np.random.default_rng(3).random(y.size) < 0.6
    got, _ = jax_backend.reduce_device(*on_device(y, None, ids), 40, mask=mask)
    want = jax_backend.reduce_arrays(y[mask], np.zeros((mask.sum(), 0)), ids[mask], 40)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-10)


@pytest.fixture
def interpreted_atomic(monkeypatch):
    monkeypatch.setattr(atomic_sums, "segment_sums",
                        functools.partial(atomic_sums.segment_sums, block_rows=BLOCK, interpret=True))
    monkeypatch.setattr(jax_backend, "_gpu", lambda array: True)
    jax_backend._device_programs.cache_clear()
    yield
    jax_backend._device_programs.cache_clear()


def distinct_rows(seed, programs, segments, offset):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.permutation(segments)[:BLOCK] for _ in range(programs)])
    y = offset + rng.normal(size=ids.size) + 0.3 * (ids % 5)
    return y, ids


def test_atomic_refines_cells_whose_float32_m2_is_not_trustworthy(interpreted_atomic):
    y, ids = distinct_rows(4, 6, 400, offset=1e9)
    # Cell 7: exactly two rows, in different programs, 1e-5 sd apart (M2 = 5e-11): its float32
    # Σd² − (Σd)²/n is all rounding, so it must be reduced again in float64.
    cell7 = np.flatnonzero(ids == 7)
    ids[cell7[2:]] = 8 + np.arange(cell7.size - 2)    # keep two rows in cell 7 (ids stay distinct a block)
    keep = np.ones(ids.size, bool)
    keep[cell7[2:]] = False
    y[cell7[1]] = y[cell7[0]] + 1e-5
    got, info = jax_backend.reduce_device(*on_device(y, None, ids), 400, mask=keep, precision="float32")
    want = jax_backend.reduce_arrays(y[keep], np.zeros((keep.sum(), 0)), ids[keep], 400)
    assert info["method"] == "atomic" and info["refined"] >= 1
    np.testing.assert_array_equal(got[0], want[0])
    assert got[2][7] == pytest.approx(want[2][7], rel=1e-6)
    seen = want[0] > 1
    assert_float32_tolerances(got, want, seen)


@pytest.mark.parametrize("block_rows", [None, 1024])
def test_many_refined_cells_are_gathered_and_reduced_in_float64(interpreted_atomic, monkeypatch, block_rows):
    # Every cell's rows lie within 1e-6 of each other, 1e9 away from zero: no float32 M2 can be
    # trusted, so every cell's rows are gathered and reduced again in float64. With BLOCK_ROWS
    # lowered to 1024 the gathered rows (2048 a bucket) go through the block scan instead.
    if block_rows:
        monkeypatch.setattr(jax_backend, "BLOCK_ROWS", block_rows)
        jax_backend._device_programs.cache_clear()
    rng = np.random.default_rng(11)
    ids = np.concatenate([rng.permutation(300)[:BLOCK] for _ in range(6)])
    y = 1e9 + 0.5 * (ids % 13) + 1e-6 * rng.normal(size=ids.size)
    keep = rng.random(ids.size) < 0.9
    traces = jax_backend.TRACES["device-refined"]
    got, info = jax_backend.reduce_device(*on_device(y, None, ids), 300, mask=keep, precision="float32")
    want = jax_backend.reduce_arrays(y[keep], np.zeros((keep.sum(), 0)), ids[keep], 300)
    assert info["method"] == "atomic" and info["refined"] == int(np.sum(want[0] > 1))
    assert jax_backend.TRACES["device-refined"] == traces + 1
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-15)
    seen = want[0] > 1
    np.testing.assert_allclose(got[2][seen], want[2][seen], rtol=1e-6)


def test_refined_cells_take_their_counts_from_the_rows(interpreted_atomic, monkeypatch):
    # A float32 partial count that reached 2²⁴ may have lost increments: its cell is refined,
    # and the count comes from the gathered rows too. The kernel here reports 2 rows for each
    # of the first 200 cells (~1365 rows), so the gather's first size (1024) is too small and
    # it runs again, larger.
    y, ids = distinct_rows(12, 8, 300, offset=5.0)
    kernel = atomic_sums.segment_sums

    def undercounting(*args, **kwargs):
        sums, count, largest, dropped = kernel(*args, **kwargs)
        lost = jnp.arange(count.shape[0]) < 200
        return (sums, jnp.where(lost, 2, count), jnp.where(lost, atomic_sums.EXACT_COUNT, largest), dropped)

    monkeypatch.setattr(atomic_sums, "segment_sums", undercounting)
    jax_backend._device_programs.cache_clear()
    traces = jax_backend.TRACES["device-refined"]
    got, info = jax_backend.reduce_device(*on_device(y, None, ids), 300, precision="float32")
    want = jax_backend.reduce_arrays(y, np.zeros((y.size, 0)), ids, 300)
    assert info["refined"] >= 200 and jax_backend.TRACES["device-refined"] == traces + 2   # two sizes
    np.testing.assert_array_equal(got[0], want[0])
    lost = np.arange(want[0].size) < 200           # refined: float64 over their rows
    np.testing.assert_allclose(got[1][lost], want[1][lost], rtol=1e-12)
    np.testing.assert_allclose(got[2][lost], want[2][lost], rtol=1e-9, atol=1e-12)
    seen = ~lost & (want[0] > 1)                   # the rest: the float32 route's tolerances
    assert_float32_tolerances(got, want, seen)


@pytest.mark.parametrize("dtype", ["int32", "float16"])
def test_atomic_converts_other_row_types_in_the_program(interpreted_atomic, dtype):
    y, ids = distinct_rows(13, 4, 300, offset=40.0)
    rows_ = np.round(y).astype(dtype)
    got, info = jax_backend.reduce_device(jnp.asarray(rows_), None, jnp.asarray(ids), 300, precision="float32")
    want = jax_backend.reduce_arrays(rows_.astype(np.float64), np.zeros((y.size, 0)), ids, 300)
    assert info["method"] == "atomic"
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], atol=1e-4)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["blocks", "atomic"])
def test_ids_past_int32_are_refused_not_wrapped(interpreted_atomic, method):
    y, ids = distinct_rows(14, 2, 300, offset=0.0)
    with jax.enable_x64(True):
        wide = jnp.asarray(ids.astype(np.int64)).at[7].set(2**32 + 5)   # would wrap to segment 5
        with pytest.raises(SpecError, match=str(2**32 + 5)):
            jax_backend.reduce_device(jnp.asarray(y.astype(np.float32)), None, wide, 300, precision="float32",
                                      method=method)


def test_no_rows_and_series_ids(interpreted_atomic):
    import polars as pl

    empty, _ = jax_backend.reduce_device(jnp.zeros(0, jnp.float32), None, jnp.zeros(0, jnp.int32), 10,
                                         precision="float32", method="atomic")
    assert empty[0].sum() == 0
    y, ids = distinct_rows(15, 2, 300, offset=0.0)
    got, _ = jax_backend.reduce_device(jnp.asarray(y), None, pl.Series(ids), 300)
    np.testing.assert_array_equal(got[0], np.bincount(ids, minlength=got[0].size))


def test_atomic_without_refinement_when_float32_suffices(interpreted_atomic):
    y, ids = distinct_rows(5, 6, 300, offset=3.0)
    got, info = jax_backend.reduce_device(*on_device(y, None, ids), 300, precision="float32")
    want = jax_backend.reduce_arrays(y, np.zeros((y.size, 0)), ids, 300)
    assert info == {"method": "atomic", "refined": 0}
    seen = want[0] > 0
    np.testing.assert_allclose(got[1][seen], want[1][seen], atol=1e-6)
    np.testing.assert_allclose(got[2][seen], want[2][seen], rtol=1e-4, atol=1e-6)


def test_atomic_reads_float64_rows_as_they_are(interpreted_atomic, monkeypatch):
    # Float64 rows at an offset of 1e9 go to the kernel unconverted (no float32 copy): the kernel
    # subtracts the float64 sampled shift itself. The moments meet the float32 route's
    # tolerances (kernels/segments.py), which rows rounded to float32 at 1e9 could not.
    y, ids = distinct_rows(8, 32, 300, offset=1e9)
    seen_dtypes = []
    kernel = atomic_sums.segment_sums
    monkeypatch.setattr(atomic_sums, "segment_sums",
                        lambda rows, *a, **k: seen_dtypes.append(rows.dtype) or kernel(rows, *a, **k))
    jax_backend._device_programs.cache_clear()
    got, info = jax_backend.reduce_device(*on_device(y, None, ids), 300, precision="float32")
    want = jax_backend.reduce_arrays(y, np.zeros((y.size, 0)), ids, 300)
    assert info["method"] == "atomic" and seen_dtypes == [jnp.float64]
    np.testing.assert_array_equal(got[0], want[0])
    seen = want[0] > 1
    assert_float32_tolerances(got, want, seen)


@pytest.mark.parametrize("method", ["blocks", "atomic"])
def test_no_eager_op_on_the_rows(interpreted_atomic, method, caplog):
    # Each eager op on the rows is a dispatch a call, and a program per row count: on an H100 the
    # first eager jnp.zeros((rows, 0)) of each row count compiled for ~20 s (session 14). The
    # conversions and defaults (x, mask, the ids' dtype) now happen inside the named programs.
    y, ids = distinct_rows(9, 3, 300, offset=0.0)
    y32 = jnp.asarray(y.astype(np.float32) if method == "atomic" else y)
    with jax.enable_x64(True):
        ids64 = jnp.asarray(ids.astype(np.int64))
    with caplog.at_level(logging.DEBUG, logger="jax"), jax.log_compiles(True):
        jax_backend.reduce_device(y32, None, ids64, 300, precision="float32", method=method)
    compiled = {m.group(1) for m in (re.search(r"Finished XLA compilation of (jit\([^)]*\))", r.getMessage())
                                     for r in caplog.records) if m}
    assert compiled and compiled <= {"jit(blocks)", "jit(atomic)", "jit(id_range)", "jit(refined)"}, compiled


@pytest.mark.parametrize("change, message", [
    (dict(segment_ids=np.array([0, 1, 5])), "segment_ids holds 5"),
    (dict(segment_ids=np.array([0, -1, 2])), "segment_ids holds -1"),
    (dict(segment_ids=np.array([0.0, 1.0, 2.0])), "dtype float"),
    (dict(segment_ids=np.array([0, 1])), r"segment_ids has shape \(2,\)"),
    (dict(x=np.zeros((2, 1))), "x has shape"),
    (dict(mask=np.ones(4, bool)), "mask has shape"),
    (dict(precision="float16"), "precision 'float16'"),
    (dict(method="sort"), "method 'sort'"),
    (dict(method="atomic"), "needs float32 precision"),
])
def test_bad_input_is_refused_before_compute(change, message):
    args = dict(y=np.array([1.0, 2.0, 3.0]), x=None, segment_ids=np.array([0, 1, 2]), num_segments=5)
    args.update(change)
    options = {k: args.pop(k) for k in ("mask", "precision", "method") if k in args}
    y, x, ids = on_device(args["y"], args["x"], args["segment_ids"])
    with pytest.raises(SpecError, match=message):
        jax_backend.reduce_device(y, x, ids, args["num_segments"], **options)


@pytest.mark.parametrize("keep_every", [1, 2])
def test_atomic_reads_float32_rows_once_about_a_sampled_shift(interpreted_atomic, keep_every):
    # 32 programs: the centre comes from every other row. keep_every=2 keeps only the rows the
    # sample skips, so the sampled mean has no rows and the mean of all kept rows stands in
    # (0/0 would make every moment NaN).
    y, ids = distinct_rows(6, 32, 300, offset=50.0)
    y32 = y.astype(np.float32)
    keep = np.arange(ids.size) % keep_every == keep_every - 1
    assert ids.size // jax_backend.CENTRE_SAMPLE == 2
    got, info = jax_backend.reduce_device(jnp.asarray(y32), None, jnp.asarray(ids), 300, mask=jnp.asarray(keep),
                                          precision="float32")
    want = jax_backend.reduce_arrays(y32[keep].astype(np.float64), np.zeros((keep.sum(), 0)), ids[keep], 300)
    assert info["method"] == "atomic"
    np.testing.assert_array_equal(got[0], want[0])
    seen = want[0] > 1
    assert_float32_tolerances(got, want, seen)


@pytest.mark.parametrize("method", ["blocks", "atomic"])
def test_ids_of_masked_rows_are_ignored_and_bad_kept_ids_named(interpreted_atomic, method):
    y, ids = distinct_rows(7, 3, 300, offset=0.0)
    y32, ids = y.astype(np.float32), ids.copy()
    keep = np.ones(ids.size, bool)
    ids[5], keep[5] = 10**6, False             # masked out: its id does not matter
    got, _ = jax_backend.reduce_device(*on_device(y32, None, ids), 300, mask=jnp.asarray(keep),
                                       precision="float32", method=method)
    np.testing.assert_array_equal(got[0], np.bincount(ids[keep], minlength=got[0].size))
    ids[BLOCK + 9] = 300                        # kept: refused, and named
    with pytest.raises(SpecError, match="segment_ids holds 300"):
        jax_backend.reduce_device(*on_device(y32, None, ids), 300, mask=jnp.asarray(keep),
                                  precision="float32", method=method)
