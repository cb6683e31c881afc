"""kernels.segments: one-pass segment moments, the pairwise merge, fixed shapes, precision."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import segments

# Compiled once per shape, as a caller would; eager op-by-op dispatch is slow.
reduce_block = jax.jit(segments.reduce_block, static_argnums=4, static_argnames="indices_are_sorted")
merge = jax.jit(segments.merge)
accumulate = jax.jit(segments.accumulate)

def reference(y, x, ids, num_segments):
    """Float64 two-pass moments per segment (NumPy, one segment at a time)."""
    k = x.shape[1]
    out = {name: [] for name in ("count", "mean", "m2", "x_mean", "xy_m2", "xx_m2")}
    for s in range(num_segments):
        ys, xs = y[ids == s].astype(np.float64), x[ids == s].astype(np.float64)
        n = len(ys)
        # Centre on the first row before averaging: a plain mean of values near 1e9 is off by ~10 ulp.
        my = ys[0] + (ys - ys[0]).mean() if n else 0.0
        mx = xs[0] + (xs - xs[0]).mean(0) if n else np.zeros(k)
        dy, dx = ys - my, xs - mx
        out["count"].append(n)
        out["mean"].append(my)
        out["m2"].append((dy**2).sum())
        out["x_mean"].append(mx)
        out["xy_m2"].append((dx * dy[:, None]).sum(0))
        out["xx_m2"].append(dx.T @ dx)
    return {name: np.array(v) for name, v in out.items()}


def random_rows(seed, rows, num_segments, k, offset=0.0, scale=1.0, sort=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_segments, rows)
    if sort:
        ids = np.sort(ids)
    y = offset + scale * (rng.standard_normal(rows) + 0.3 * ids)
    x = offset + scale * rng.standard_normal((rows, k))
    return y, x, ids


def assert_moments(got: segments.Moments, ref, *, rel, sd=1.0, mean_atol=None):
    """Counts exactly; means to ``mean_atol`` (default rel·sd); sums of squares to rel·n·sd²."""
    count = ref["count"]
    np.testing.assert_array_equal(np.asarray(got.count), count)
    mean_atol = rel * sd if mean_atol is None else mean_atol
    np.testing.assert_allclose(np.asarray(got.mean, np.float64), ref["mean"], rtol=0, atol=mean_atol)
    np.testing.assert_allclose(np.asarray(got.x_mean, np.float64), ref["x_mean"], rtol=0, atol=mean_atol)
    for name in ("m2", "xy_m2", "xx_m2"):
        scale = count.reshape((-1,) + (1,) * (ref[name].ndim - 1)) * sd**2
        error = np.abs(np.asarray(getattr(got, name), np.float64) - ref[name])
        assert np.all(error <= rel * scale), (name, float((error / np.maximum(scale, 1e-300)).max()))


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("sort", [False, True])
def test_reduce_block_matches_reference(k, sort):
    y, x, ids = random_rows(1 + k, 500, 17, k, sort=sort)
    got = reduce_block(jnp.asarray(y), jnp.asarray(x), jnp.asarray(ids), jnp.ones(500, bool), 17,
                                indices_are_sorted=sort)
    assert_moments(got, reference(y, x, ids, 17), rel=1e-12)
    assert got.xx_m2.shape == (17, k, k)
    np.testing.assert_array_equal(got.xx_m2, np.swapaxes(np.asarray(got.xx_m2), 1, 2))


def test_masked_and_out_of_range_rows_count_for_nothing():
    y, x, ids = random_rows(2, 300, 9, 2)
    mask = np.arange(300) % 4 != 0
    poisoned_y = np.where(mask, y, np.nan)
    poisoned_x = np.where(mask[:, None], x, np.inf)
    ids_out = np.where(np.arange(300) % 7 == 0, 9, ids)  # id 9 == num_segments: dropped
    got = reduce_block(jnp.asarray(poisoned_y), jnp.asarray(poisoned_x), jnp.asarray(ids_out),
                                jnp.asarray(mask), 9)
    keep = mask & (ids_out < 9)
    assert_moments(got, reference(y[keep], x[keep], ids[keep], 9), rel=1e-12)


def test_empty_segments_and_single_rows():
    y = jnp.array([5.0, 1e9 + 0.5, 7.0])
    x = jnp.array([[1.0], [2.0], [3.0]])
    got = reduce_block(y, x, jnp.array([0, 2, 0]), jnp.ones(3, bool), 4)
    assert np.asarray(got.count).tolist() == [2, 0, 1, 0]
    assert np.asarray(got.mean).tolist() == [6.0, 0.0, 1e9 + 0.5, 0.0]
    assert np.asarray(got.m2).tolist() == [2.0, 0.0, 0.0, 0.0]
    assert np.asarray(got.xy_m2)[:, 0].tolist() == [2.0, 0.0, 0.0, 0.0]


def test_given_shift_matches_first_value_shift():
    y, x, ids = random_rows(3, 400, 11, 2, offset=50.0)
    args = (jnp.asarray(y), jnp.asarray(x), jnp.asarray(ids), jnp.ones(400, bool), 11)
    default = reduce_block(*args)
    shifted = reduce_block(*args, shift=jnp.array([50.0, 50.0, 50.0]))
    for a, b in zip(default, shifted):
        if a.dtype.kind == "f" and a is not default.shift and a is not default.offset:
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(default.mean, shifted.mean, rtol=1e-13)


def split_states(y, x, ids, num_segments, cuts):
    on = jnp.ones(len(y), bool)
    states = []
    for lo, hi in zip([0, *cuts], [*cuts, len(y)]):
        states.append(reduce_block(jnp.asarray(y[lo:hi]), jnp.asarray(x[lo:hi]), jnp.asarray(ids[lo:hi]),
                                            on[lo:hi], num_segments))
    return states


@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_merge_is_associative_with_empty_as_identity(offset):
    y, x, ids = random_rows(4, 900, 13, 2, offset=offset)
    a, b, c = split_states(y, x, ids, 13, [250, 700])
    ref = reference(y, x, ids, 13)
    left = merge(merge(a, b), c)
    right = merge(a, merge(b, c))
    # Means at offset 1e9 are resolved to one ulp (1.2e-7); sums of squares stay at 1e-12 of n·sd².
    for state in (left, right, merge(c, merge(a, b))):
        assert_moments(state, ref, rel=1e-12, mean_atol=1e-12 + 2.5e-16 * offset)
    empty = segments.empty(13, 2)
    for with_empty in (merge(empty, a), merge(a, empty)):
        for got, want in zip((with_empty.count, with_empty.mean, with_empty.m2, with_empty.xx_m2),
                             (a.count, a.mean, a.m2, a.xx_m2)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_blocks_at_large_offset_stay_exact_in_float64(offset):
    """Mean 1e9, sd 1: every block and merge subtracts data values from data values."""
    y, x, ids = random_rows(5, 20_000, 31, 2, offset=offset)
    state = segments.empty(32, 2)
    for block in segments.iter_blocks(y, x, ids, 1024, 32):
        state = accumulate(state, *block)
    ref = reference(y, x, ids, 32)
    assert_moments(state, ref, rel=1e-11, mean_atol=1e-12 + 2.5e-16 * offset)


def test_reduce_blocks_scan_equals_block_loop():
    y, x, ids = random_rows(6, 3000, 20, 1)
    pad = 4096 - 3000
    padded = (np.concatenate([y, np.zeros(pad)]), np.concatenate([x, np.zeros((pad, 1))]),
              np.concatenate([ids, np.full(pad, 20)]), np.arange(4096) < 3000)
    scanned = jax.jit(segments.reduce_blocks, static_argnums=(4, 5))(*map(jnp.asarray, padded), 20, 512)
    looped = segments.empty(20, 1)
    for block in segments.iter_blocks(y, x, ids, 512, 20):
        looped = accumulate(looped, *block)
    for a, b in zip(scanned, looped):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of block_rows"):
        segments.reduce_blocks(jnp.zeros(10), jnp.zeros((10, 0)), jnp.zeros(10, int), jnp.ones(10, bool), 2, 4)


def test_block_step_does_not_retrace_for_new_row_counts():
    traces = []

    def counted(state, y, x, ids, mask):
        traces.append(1)  # Python side effect: runs once per trace
        return segments.accumulate(state, y, x, ids, mask)

    step = jax.jit(counted)
    block = segments.block_rows_for(1500, max_block_rows=1024)
    for rows in (1000, 1500, 4000, 4097):
        y, x, ids = random_rows(rows, rows, 40, 1)
        state = segments.empty(segments.bucket(40, 64), 1)
        for part in segments.iter_blocks(y, x, ids, block, 64):
            state = step(state, *part)
        assert_moments(jax.tree.map(lambda a: a[:40], state), reference(y, x, ids, 40), rel=1e-11)
    assert len(traces) == 1


def test_buckets():
    assert [segments.bucket(n, 64) for n in (1, 64, 65, 1000)] == [64, 64, 128, 1024]
    assert segments.block_rows_for(10) == 1024
    assert segments.block_rows_for(5000) == 8192
    assert segments.block_rows_for(10**9) == 1 << 20
    blocks = list(segments.iter_blocks(np.arange(5.0), np.zeros((5, 0)), np.arange(5), 4, 9))
    assert [b[3].sum() for b in blocks] == [4, 1] and blocks[1][2].tolist() == [4, 9, 9, 9]


def float32_moments(y, x, ids, num_segments):
    """Reduce in float32 blocks of 2¹⁶ rows after subtracting the column means in float64."""
    cy, cx = y.mean(), x.mean(0)
    y32, x32 = (y - cy).astype(np.float32), (x - cx).astype(np.float32)
    state = segments.empty(num_segments, x.shape[1], jnp.float32)
    for block in segments.iter_blocks(y32, x32, ids, 1 << 16, num_segments):
        state = accumulate(state, *block)
    assert state.m2.dtype == jnp.float32
    # Back to float64, the centre added back to the shift (means are shift + offset).
    as64 = jax.tree.map(lambda a: np.asarray(a, np.float64) if a.dtype == jnp.float32 else np.asarray(a), state)
    return as64._replace(shift=as64.shift + np.concatenate([[cy], cx]))


def test_float32_at_offset_1e9():
    """The DESIGN's float32 check: mean 1e9, sd 1, against the float64 reference.

    Raw float32 rows near 1e9 are 64 apart, so raw float32 cannot work; centred
    in float64 first (what ``engine.reduce.jax`` does for float32), it meets
    2e-5·sd on means and 2e-4 of n·sd² on sums of squares.
    """
    y, x, ids = random_rows(7, 200_000, 50, 2, offset=1e9)
    ref = reference(y, x, ids, 50)
    assert_moments(float32_moments(y, x, ids, 50), ref, rel=2e-4, mean_atol=2e-5)

    raw = segments.empty(50, 2, jnp.float32)
    for block in segments.iter_blocks(y.astype(np.float32), x.astype(np.float32), ids, 1 << 16, 50):
        raw = accumulate(raw, *block)
    m2_error = np.abs(np.asarray(raw.m2, np.float64) - ref["m2"]) / ref["count"]
    assert m2_error.max() > 1.0, "raw float32 at 1e9 should have lost the within-cell spread"


reduce_sums = jax.jit(segments.reduce_sums, static_argnums=4, static_argnames=("accumulate_dtype", "fused"))


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_reduce_sums_matches_reference_about_a_global_shift(k, fused):
    """One scatter of raw sums about one shift per column, at offset 1e9 (float64)."""
    y, x, ids = random_rows(11, 30_000, 40, k, offset=1e9)
    ref = reference(y, x, ids, 40)
    shift = np.concatenate([[y[0]], x[0]])
    mask = np.ones(y.shape[0], bool)
    got, cancellation = reduce_sums(y, x, ids, mask, 40, shift, fused=fused)
    # Segment means sit up to ~12 sd from the shift: cancellation ≤ ~150, error ~√n·ε·150.
    assert float(np.max(cancellation)) < 500
    assert_moments(got, ref, rel=1e-10)


def test_reduce_sums_float32_rows_float64_sums_and_merge():
    """float32 rows centred in float64 first (the accelerator route), sums in float64: within
    the float32 tolerance of ``test_float32_at_offset_1e9``; halves merged equal the whole."""
    y, x, ids = random_rows(12, 100_000, 30, 1, offset=1e9)
    ref = reference(y, x, ids, 30)
    cy, cx = y.mean(), x.mean(0)
    y32, x32 = (y - cy).astype(np.float32), (x - cx).astype(np.float32)
    mask = np.ones(y.shape[0], bool)
    half = y.shape[0] // 2
    parts = [reduce_sums(y32[s], x32[s], ids[s], mask[s], 30, np.zeros(2, np.float32),
                         accumulate_dtype=jnp.float64)[0] for s in (slice(0, half), slice(half, None))]
    merged = merge(*parts)
    as64 = jax.tree.map(np.asarray, merged)
    as64 = as64._replace(shift=as64.shift + np.concatenate([[cy], cx]))
    assert_moments(as64, ref, rel=2e-4, mean_atol=2e-5)


def test_reduce_sums_drops_masked_and_out_of_range_rows():
    y = np.array([1.0, 2.0, 100.0, 3.0, 7.0])
    ids = np.array([0, 0, 0, 1, 2])           # segment 2 is out of range for 2 segments
    mask = np.array([True, True, False, True, True])
    got, cancellation = reduce_sums(y, np.zeros((5, 0)), ids, mask, 2, np.zeros(1))
    assert np.asarray(got.count).tolist() == [2, 1]
    np.testing.assert_allclose(np.asarray(got.mean), [1.5, 3.0])
    np.testing.assert_allclose(np.asarray(got.m2), [0.5, 0.0])
    assert np.asarray(cancellation)[1] == 1.0   # M2 = 0: nothing to amplify, reported as 1


def test_reduce_sums_about_per_segment_shifts():
    """Shifts per segment (e.g. a running state's): segments 1e7 sds apart at offset 1e9 stay
    exact, and the cancellation factor is ~1 where each shift is a value of its segment."""
    rng = np.random.default_rng(13)
    ids = rng.integers(0, 25, 20_000)
    y = 1e9 + 1e7 * ids + rng.standard_normal(ids.size)
    x = (3.0 + 1e5 * ids)[:, None] + rng.standard_normal((ids.size, 1))
    ref = reference(y, x, ids, 25)
    first = np.array([np.flatnonzero(ids == s)[0] for s in range(25)])
    shift = np.stack([y[first], x[first, 0]], axis=1)
    got, cancellation = reduce_sums(y, x, ids, np.ones(ids.size, bool), 25, shift)
    assert float(np.max(cancellation)) < 50
    assert_moments(got, ref, rel=1e-10)
    _, global_cancellation = reduce_sums(y, x, ids, np.ones(ids.size, bool), 25, shift[0])
    assert float(np.max(global_cancellation)) > 1e12   # one shift for all: the raw sums would cancel


def test_reduce_sums_flags_complete_cancellation():
    """Rows at 1e9 summed raw about 0: M2 cancels to nothing in float64, and the factor says so."""
    got, cancellation = reduce_sums(np.array([1e9, 1e9 + 1.0]), np.zeros((2, 0)), np.array([0, 0]),
                                    np.ones(2, bool), 1, np.zeros(1))
    assert float(got.m2[0]) != 0.5 and np.isinf(np.asarray(cancellation)[0])
