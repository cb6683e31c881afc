"""kernels.atomic_sums: the Pallas vector-atomic segment sums.

The kernel runs on NVIDIA GPUs only; here it runs through Pallas' interpreter, whose atomics are
plain read-modify-writes: within one program a segment keeps only one row's values. So every
program here holds distinct ids, which checks the kernel's indexing (slots, replicas, spill,
masks, the partial last block) but not atomicity. The GPU run (benchmarks/gpu/run.py,
``correctness``) checks the kernel itself against a float64 reference at mean 1e9.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import atomic_sums, segments

BLOCK = 256


def distinct_rows(seed, programs, num_segments, rows=None, offset=0.0):
    """Rows whose ids are distinct within each block of BLOCK rows (an interpreter-safe input)."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.permutation(num_segments)[:BLOCK] for _ in range(programs)])
    rows = rows or ids.size
    ids = ids[:rows].astype(np.int32)
    y = (offset + rng.normal(size=rows)).astype(np.float32)
    mask = rng.random(rows) < 0.8
    return y, ids, mask


def reference_sums(y, ids, mask, num_segments, shift):
    keep = mask & (ids >= 0) & (ids < num_segments)
    d = y.astype(np.float64) - shift
    return np.stack([np.bincount(ids[keep], v[keep], num_segments) for v in (np.ones_like(d), d, d * d)], 1)


def interpreted(num_segments, shift=0.0, **options):
    return jax.jit(lambda y, ids, mask: atomic_sums.segment_sums(
        y, ids, mask, num_segments, shift, block_rows=BLOCK, interpret=True, **options))


@pytest.mark.parametrize("replicas", [1, 2, 8])
def test_sums_match_float64_reference(replicas):
    # 5 programs, the last one partial (ids past the rows are not read), 20% masked rows.
    y, ids, mask = distinct_rows(0, 5, 700, rows=5 * BLOCK - 37, offset=3.0)
    sums, count, largest, dropped = interpreted(700, 3.0, replicas=replicas)(y, ids, mask)
    assert int(dropped) == 0
    ref = reference_sums(y, ids, mask, 700, 3.0)
    np.testing.assert_array_equal(np.asarray(count), ref[:, 0].astype(np.int64))
    np.testing.assert_allclose(np.asarray(sums), ref, rtol=0, atol=5e-6 * np.abs(ref).max())
    # Distinct ids within a program: a segment's partial holds at most one row per program.
    assert 1 <= int(np.max(largest)) <= -(-5 // replicas)


def test_float64_rows_are_shifted_in_float64_then_summed_in_float32():
    # Mean 1e9, sd 1: float32 rows would have no spread left; float64 rows with a float64 shift
    # keep it, and each d is rounded to float32 once (relative error 2⁻²⁴ a row).
    _, ids, mask = distinct_rows(6, 4, 500, rows=4 * BLOCK - 11)
    rng = np.random.default_rng(60)
    y = 1e9 + rng.normal(size=ids.size) + 0.01 * (ids % 9)
    with jax.enable_x64(True):
        sums, count, _, dropped = interpreted(500, 1e9 + 0.04)(jnp.asarray(y), ids, mask)
        sums = np.asarray(sums)
    assert int(dropped) == 0
    ref = reference_sums(y, ids, mask, 500, 1e9 + 0.04)
    np.testing.assert_array_equal(np.asarray(count), ref[:, 0].astype(np.int64))
    # One float32 rounding of each |d| ≲ 4 (the sums here hold ≤ 4 rows): ≤ 4·4·2⁻²⁴ for Σd,
    # twice that relative for Σd². Rounded to float32 first, 1e9 + d would be off by up to 32.
    np.testing.assert_allclose(sums[:, 1], ref[:, 1], rtol=0, atol=16 * 2.0**-24 * 4)
    np.testing.assert_allclose(sums[:, 2], ref[:, 2], rtol=4 * 2.0**-23, atol=1e-6)


def test_out_of_range_ids_are_dropped():
    y, ids, mask = distinct_rows(1, 2, 300)
    ids = ids.copy()
    ids[:10] = -1
    ids[10:20] = 300 + np.arange(10)     # past the segments: dropped, not wrapped
    sums, count, _, dropped = interpreted(300)(y, ids, np.ones_like(mask))
    ref = reference_sums(y, ids, np.ones_like(mask), 300, 0.0)
    np.testing.assert_array_equal(np.asarray(count), ref[:, 0])
    np.testing.assert_allclose(np.asarray(sums), ref, atol=1e-5)
    assert int(dropped) >= 1             # counted, for the caller's error (see the next test)


def test_dropped_rows_are_counted():
    # One out-of-range id a program: the interpreter's adds into one slot are not atomic.
    y, ids, mask = distinct_rows(5, 6, 300)
    ids = ids.copy()
    ids[np.arange(6) * BLOCK + 3] = [-1, 300, 301, -7, 2**30, 299]   # the last one is in range
    mask = np.ones_like(mask)
    assert int(interpreted(300)(y, ids, mask)[3]) == 5
    mask[3] = False                       # a masked row is not counted, whatever its id
    assert int(interpreted(300)(y, ids, mask)[3]) == 4


def test_default_replicas_keep_the_table_small():
    for segments_ in (10, 1000, 200_000, 20_000_000):
        r = atomic_sums.default_replicas(segments_)
        assert r >= 1 and r & (r - 1) == 0 and r <= atomic_sums.MAX_REPLICAS
        table = r * (segments_ + atomic_sums.SPILL + 1) * atomic_sums.SLOT * 4
        assert table <= atomic_sums.TABLE_BYTES or r == 1
    assert atomic_sums.default_replicas(100) == atomic_sums.MAX_REPLICAS
    assert atomic_sums.default_replicas(20_000_000) == 1


def test_bad_arguments():
    y, ids, mask = distinct_rows(2, 1, 300)
    with pytest.raises(TypeError, match="float32 or float64"):
        atomic_sums.segment_sums(y.astype(np.float16), ids, mask, 300, 0.0, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        atomic_sums.segment_sums(y, ids, mask, 300, 0.0, block_rows=1000, interpret=True)
    with pytest.raises(ValueError, match="covariates"):
        segments.reduce_sums(jnp.asarray(y), jnp.zeros((y.size, 1), jnp.float32), jnp.asarray(ids),
                             jnp.asarray(mask), 300, jnp.zeros((2,), jnp.float32), scatter="atomic")
    with pytest.raises(ValueError, match="scatter"):
        segments.reduce_sums(jnp.asarray(y), jnp.zeros((y.size, 0), jnp.float32), jnp.asarray(ids),
                             jnp.asarray(mask), 300, jnp.zeros((1,), jnp.float32), scatter="numba")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_kernel_lowers_to_triton_for_cuda(dtype):
    # Pallas → Triton IR happens here, on any host; Triton → PTX only on the GPU.
    with jax.enable_x64(dtype == "float64"):
        text = atomic_sums.lowers_for_cuda(num_segments=512, rows=3000, dtype=jnp.dtype(dtype))
    assert "__gpu$xla.gpu.triton" in text and f"tensor<3000x{dtype.replace('float', 'f')}>" in text


@pytest.fixture
def interpreted_reduce_sums(monkeypatch):
    monkeypatch.setattr(atomic_sums, "segment_sums",
                        functools.partial(atomic_sums.segment_sums, block_rows=BLOCK, interpret=True))
    return jax.jit(segments.reduce_sums, static_argnums=4, static_argnames="scatter")


def test_reduce_sums_atomic_agrees_with_xla_scatter(interpreted_reduce_sums):
    y, ids, mask = distinct_rows(3, 6, 500, offset=0.5)
    args = (jnp.asarray(y), jnp.zeros((y.size, 0), jnp.float32), jnp.asarray(ids), jnp.asarray(mask), 500,
            jnp.zeros((1,), jnp.float32))
    atomic, cancel_a = interpreted_reduce_sums(*args, scatter="atomic")
    xla, cancel_x = interpreted_reduce_sums(*args, scatter="xla")
    np.testing.assert_array_equal(np.asarray(atomic.count), np.asarray(xla.count))
    np.testing.assert_allclose(np.asarray(atomic.mean), np.asarray(xla.mean), atol=1e-6)
    np.testing.assert_allclose(np.asarray(atomic.m2), np.asarray(xla.m2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cancel_a), np.asarray(cancel_x), rtol=1e-4)


def test_a_count_that_may_have_lost_increments_falls_back(interpreted_reduce_sums, monkeypatch):
    # With 2²⁴ lowered to 2, any segment with two rows in one replica's partial is flagged.
    monkeypatch.setattr(atomic_sums, "EXACT_COUNT", 2)
    monkeypatch.setattr(atomic_sums, "default_replicas", lambda num_segments: 1)
    y, ids, mask = distinct_rows(4, 3, 400)
    mask = np.ones_like(mask)
    args = (jnp.asarray(y), jnp.zeros((y.size, 0), jnp.float32), jnp.asarray(ids), jnp.asarray(mask), 400,
            jnp.zeros((1,), jnp.float32))
    moments, cancellation = interpreted_reduce_sums(*args, scatter="atomic")
    flagged = ~np.isfinite(np.asarray(cancellation))
    np.testing.assert_array_equal(flagged, np.asarray(moments.count) >= 2)
    assert flagged.any() and not flagged.all()
