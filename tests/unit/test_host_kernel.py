"""kernels.host: the corrected two-pass reduction against exact sums, and its merge; with its
NumPy passes and with the compiled ones of engine.reduce.fused (Numba)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.reduce import fused
from kernels import host

PASSES = {"numpy": host.NUMPY, "fused": fused.PASSES, "direct": fused.PASSES}


def direct(monkeypatch):
    """fused.direct_sums at any segment count (it stands in for the passes from
    ``DIRECT_SEGMENTS`` on)."""
    monkeypatch.setattr(fused, "DIRECT_SEGMENTS", 0)


@pytest.fixture(params=sorted(PASSES))
def passes(request, monkeypatch):
    if PASSES[request.param] is None:
        pytest.skip("numba is not installed")
    if request.param == "direct":
        direct(monkeypatch)
    return PASSES[request.param]


def exact_moments(ids, y, x, segments):
    """Per-segment moments in rational arithmetic from the float64 inputs: no rounding at all."""
    out = []
    for s in range(segments):
        rows = np.flatnonzero(ids == s)
        ys = [Fraction(float(v)) for v in y[rows]]
        xs = [[Fraction(float(v)) for v in x[rows, j]] for j in range(x.shape[1])]
        n = len(rows)
        if n == 0:
            out.append(None)
            continue
        my = sum(ys) / n
        mx = [sum(c) / n for c in xs]
        out.append(dict(n=n, mean=my, m2=sum((v - my) ** 2 for v in ys), x_mean=mx,
                        xy=[sum((a - m) * (v - my) for a, v in zip(c, ys)) for c, m in zip(xs, mx)],
                        xx=[[sum((a - mx[i]) * (b - mx[j]) for a, b in zip(xs[i], xs[j]))
                             for j in range(len(xs))] for i in range(len(xs))]))
    return out


@pytest.mark.parametrize("threads, chunk_rows", [(1, 1 << 18), (2, 1 << 18), (2, 256)])
def test_moments_match_exact_sums_at_offset_1e9(threads, chunk_rows, passes, monkeypatch):
    """Mean 1e9, sd 1 (a float64 sum of the raw values is off by ~√n·ε·1e9): the corrected
    two-pass moments equal exact rational ones to a few ulps of the mean and of n·sd²."""
    monkeypatch.setattr(host, "SPLIT_ROWS", 16)
    monkeypatch.setattr(host, "CHUNK_ROWS", chunk_rows)   # 256: passes run in chunks of 256 rows
    rng = np.random.default_rng(0)
    rows, segments = 3_000, 7
    ids = rng.integers(0, segments - 1, rows)         # the last segment stays empty
    y = rng.normal(1e9, 1.0, rows)
    x = np.stack([rng.normal(-3e8, 2.0, rows), rng.normal(0.0, 1e-3, rows)], axis=1)
    got = host.reduce(ids, y, x, segments, threads=threads, passes=passes)
    want = exact_moments(ids, y, x, segments)
    eps = np.finfo(float).eps
    assert got.count[-1] == 0 and got.m2[-1] == 0 and np.all(got.xx_m2[-1] == 0)
    for s, w in enumerate(want[:-1]):
        n = w["n"]
        assert got.count[s] == n
        assert abs(got.mean[s] - float(w["mean"])) <= 4 * eps * 1e9
        assert abs(got.m2[s] - float(w["m2"])) <= 1e-9 * n
        for j, sd in enumerate((2.0, 1e-3)):
            assert abs(got.x_mean[s, j] - float(w["x_mean"][j])) <= 4 * eps * (3e8 if j == 0 else 1)
            assert abs(got.xy_m2[s, j] - float(w["xy"][j])) <= 1e-9 * n * sd
            for i, sd_i in enumerate((2.0, 1e-3)):
                assert abs(got.xx_m2[s, i, j] - float(w["xx"][i][j])) <= 1e-9 * n * sd * sd_i
                assert got.xx_m2[s, i, j] == got.xx_m2[s, j, i]


def test_split_is_deterministic_and_close_to_one_pass(passes):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 400_000)
    y, x = rng.normal(3.0, 1.0, ids.size), rng.normal(size=(ids.size, 1))
    two = host.reduce(ids, y, x, 50, threads=2, passes=passes)
    assert all(np.array_equal(a, b) for a, b in zip(two, host.reduce(ids, y, x, 50, threads=2, passes=passes)))
    one = host.reduce(ids, y, x, 50, threads=1, passes=passes)
    assert np.array_equal(one.count, two.count)
    for a, b in zip(one[1:], two[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_merge_with_empty_sides_is_exact():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 3, 100)
    y, x = rng.normal(size=100), rng.normal(size=(100, 1))
    part = host.reduce(ids, y, x, 4, threads=1)
    empty = host.reduce(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 1)), 4, threads=1)
    for merged in (host.merge(part, empty), host.merge(empty, part)):
        assert all(np.array_equal(a, b) for a, b in zip(merged, part))


def test_out_of_range_segment_and_bad_shapes_are_refused(passes):
    with pytest.raises(ValueError, match="outside"):
        host.reduce(np.array([0, 5]), np.zeros(2), np.zeros((2, 0)), 3, threads=1, passes=passes)
    if passes is not host.NUMPY:   # np.bincount refuses negative ids with its own message
        with pytest.raises(ValueError, match="segment id -1 is outside"):
            host.reduce(np.array([0, -1]), np.zeros(2), np.zeros((2, 1)), 3, threads=1, passes=passes)
    with pytest.raises(ValueError, match="rows"):
        host.reduce(np.array([0, 1]), np.zeros(2), np.zeros((3, 1)), 3)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("route", ["fused", "direct"])
def test_fused_passes_agree_with_numpy_passes_about_running_shifts(k, route, monkeypatch):
    """Each covariate count the fused loops specialise (0, 1) and the general loop (3), for a
    first batch and for a later one added about the first one's shifts (some segments new);
    the direct route at 40 segments."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(5 + k)
    segments = 40
    first_ids, later_ids = rng.integers(0, 30, 50_000), rng.integers(0, segments, 50_000)
    y1, y2 = rng.normal(1e9, 1.0, first_ids.size), rng.normal(1e9 + 0.5, 1.0, later_ids.size)
    x1, x2 = rng.normal(size=(first_ids.size, k)), rng.normal(size=(later_ids.size, k))
    for passes in (host.NUMPY, fused.PASSES):
        if route == "direct" and passes is fused.PASSES:
            direct(monkeypatch)
        state = host.accumulate(first_ids, y1, x1, segments, passes=passes)
        later = host.accumulate(later_ids, y2, x2, segments, shift=state.shift, seen=state.count > 0,
                                passes=passes)
        got = host.finish(host.Sums(state.count + later.count, later.shift, state.sums + later.sums,
                                    state.products + later.products))
        if passes is host.NUMPY:
            want = got
            continue
        np.testing.assert_array_equal(got.count, want.count)
        n = np.maximum(want.count, 1).astype(float)

        def close(a, b, tolerance):
            assert np.all(np.abs(a - b) <= tolerance), float(np.max(np.abs(a - b) - tolerance))

        close(got.mean, want.mean, 4e-16 * 1e9)          # a few ulps at 1e9
        close(got.m2, want.m2, 1e-12 * n)                # sd 1: units of n·sd²
        close(got.x_mean, want.x_mean, 1e-14)
        close(got.xy_m2, want.xy_m2, 1e-12 * n[:, None])
        close(got.xx_m2, want.xx_m2, 1e-12 * n[:, None, None])


@pytest.mark.parametrize("dtype, low, high", [(np.int8, -100, 120), (np.int64, 2**63 - 500, 2**63 - 1),
                                              (np.uint64, 2**64 - 300, 2**64 - 1), (np.int32, -5, 70_000)])
def test_fused_segment_ids_never_wrap(dtype, low, high):
    """2·(key − low) + arm for keys near the ends of their type, below and above 2¹⁶ rows
    (the two-thread split), as Python integers compute it."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(9)
    for rows in (1_000, 70_000):
        offsets = rng.integers(0, high - low + 1, rows, dtype=np.uint64)
        key = (np.uint64(low % 2**64) + offsets).astype(dtype) if dtype is np.uint64 else \
            (low + offsets.astype(np.int64)).astype(dtype)
        arm = rng.integers(0, 2, rows).astype(np.int8)
        want = np.array([2 * (int(k) - low) + int(a) for k, a in zip(key, arm)], np.int64)
        np.testing.assert_array_equal(fused.segment_ids(key, arm, low), want)
        np.testing.assert_array_equal(fused.segment_ids(key, arm.astype(bool), low), want)


@pytest.mark.parametrize("half", [0, 1])
def test_direct_route_refines_a_segment_whose_first_row_is_far_out(half, monkeypatch):
    """The direct route adds each new segment's rows about its first row in each half of the
    rows: sums whose M2 would carry a relative rounding of ~ε·√n·Σd²/M2, up to ~ε·n^1.5
    (Σd²/M2 ≤ 1 + n), ~1e-7 for a segment of 10⁶ rows whose first row is 10⁴ sds out. Such a
    segment (and only it) is added again about its mean, whichever half the far row opens
    (in the second, moving that half's sums to the first half's shift would hide their
    rounding), which leaves the moments equal to the NumPy two-pass ones to 1e-11."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    direct(monkeypatch)
    refined = []
    loop = fused._fold_loop

    def fold_loop(first, second, a, b, seen, refine, again, *rest):
        more = loop(first, second, a, b, seen, refine, again, *rest)
        if more:
            refined.append(np.flatnonzero(again[a:b]) + a)
        return more

    monkeypatch.setattr(fused, "_fold_loop", fold_loop)
    rng = np.random.default_rng(9)
    rows = 1_000_000
    ids = np.where(rng.random(rows) < 0.9, 0, rng.integers(1, 11, rows))    # segment 0: ~9e5 rows
    y = rng.normal(1e9, 1.0, rows)
    x = rng.normal(5.0, 2.0, (rows, 1))
    far = half * rows // 2                          # segment 0's first row in that half, far out
    ids[0] = ids[far] = 0
    y[far], x[far, 0] = 1e9 + 1e4, 5.0 + 2e4
    got = host.reduce(ids, y, x, 11, passes=fused.PASSES)
    want = host.reduce(ids, y, x, 11, passes=host.NUMPY)
    assert [r.tolist() for r in refined] == [[0]]
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-15)
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-11)
    np.testing.assert_allclose(got.xx_m2, want.xx_m2, rtol=1e-11)
    scale = np.sqrt(want.m2 * want.xx_m2[:, 0, 0])                     # |Σxy| ≤ √(M2·Σxx)
    assert np.all(np.abs(got.xy_m2[:, 0] - want.xy_m2[:, 0]) <= 1e-11 * scale)


def test_direct_route_refuses_out_of_range_ids_and_keeps_shifts(monkeypatch):
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    direct(monkeypatch)
    for ids, bad in (([0, 9, 1], 9), ([0, 1, -2], -2)):
        with pytest.raises(ValueError, match=f"segment id {bad} is outside"):
            fused.direct_sums(np.array(ids), np.zeros(3), np.zeros((3, 0)), 9)
    key, arm = np.array([3, 7, 12], np.int64), np.array([0, 1, 1], np.int8)
    with pytest.raises(ValueError, match="segment id 19 is outside"):             # 2·(12 − 3) + 1
        fused.direct_sums(key, np.zeros(3), np.zeros((3, 1)), 18, arm=arm, low=3)
    low = 2**64 - 3000                                            # UInt64 keys above 2⁶³
    key = np.array([low, 2**64 - 1, low + 1], np.uint64)
    for sums in (lambda: fused.direct_sums(key, np.zeros(3), np.zeros((3, 0)), 4096, arm=arm * 0, low=low),
                 lambda: fused.deviation_sums(key, np.zeros(3), np.zeros((3, 0)), np.zeros((1, 4096)), 4096, True,
                                              arm=arm * 0, low=low)):
        with pytest.raises(ValueError, match="segment id 5998 is outside"):      # 2·2999
            sums()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 8, 500)                                       # segment 8 has no rows
    shift, seen = rng.normal(size=(1, 9)), np.arange(9) % 3 == 0
    got = fused.direct_sums(ids, rng.normal(size=500), np.zeros((500, 0)), 9, shift, seen)
    assert np.array_equal(got.shift[:, seen], shift[:, seen])     # the caller's, where it has one
    y = rng.normal(size=500)
    unseen = fused.direct_sums(ids, y, np.zeros((500, 0)), 9)
    for got in (fused.direct_sums(ids, y, np.zeros((500, 0)), 9, shift),       # a shift but no ``seen``
                host.accumulate(ids, y, np.zeros((500, 0)), 9, shift=shift, passes=fused.PASSES)):
        assert all(np.array_equal(a, b) for a, b in zip(got, unseen))     # as accumulate: none seen
    monkeypatch.setattr(fused, "DIRECT_SEGMENTS", 10)
    assert fused.direct_sums(ids, np.zeros(500), np.zeros((500, 0)), 9) is None   # declined


@pytest.mark.parametrize("k", [0, 1, 3])
def test_direct_fold_is_direct_sums_then_the_far_test_then_an_add(k, monkeypatch):
    """``direct_fold`` into a run's arrays (views into wider ones, as a dense run passes) gives
    the bits of ``direct_sums`` about the run's shifts, ``far_segments`` and an add, and leaves
    the segments that fail the far test as they were; keys and arms give the bits of their
    segment ids, for UInt64 keys near 2⁶⁴ too."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    direct(monkeypatch)
    rng = np.random.default_rng(30 + k)
    segments, rows = 60, 40_000
    first_ids = np.where(np.arange(rows) == 5, 7, rng.integers(8, 50, rows))   # segment 7: one row
    later_ids = np.where(rng.random(rows) < 0.5, 7, rng.integers(0, segments, rows))  # 50–59 new here
    y1, y2 = rng.normal(1e9, 1.0, rows), rng.normal(1e9, 1.0, rows)
    y1[5] += 1e7            # that row 1e7 sds above segment 7's ~2·10⁴ later ones: its shift, far out
    x1, x2 = rng.normal(size=(rows, k)), rng.normal(size=(rows, k))
    state = fused.direct_sums(first_ids, y1, x1, segments)
    seen = state.count > 0
    part = fused.direct_sums(later_ids, y2, x2, segments, state.shift, seen)
    want_far = fused.far_segments(state, part, 1e-11)
    assert want_far[7] and want_far.sum() == 1
    wide = [np.concatenate([np.zeros(a.shape[:-1] + (3,), a.dtype), a, np.zeros(a.shape[:-1] + (2,), a.dtype)],
                           axis=-1) for a in state]
    into = tuple(a[..., 3:3 + segments] for a in wide)
    low = np.uint64(2**64 - 100)
    key, arm = (low + (later_ids // 2).astype(np.uint64)), (later_ids % 2).astype(np.int8)
    far = fused.direct_fold(key, y2, x2, into, 1e-11, arm=arm, low=int(low))
    np.testing.assert_array_equal(far, want_far)
    keep = ~want_far
    np.testing.assert_array_equal(into[0][keep], (state.count + part.count)[keep])
    np.testing.assert_array_equal(into[1][:, keep], np.where(seen, state.shift, part.shift)[:, keep])
    np.testing.assert_array_equal(into[2][:, keep], (state.sums + part.sums)[:, keep])
    np.testing.assert_array_equal(into[3][..., keep], (state.products + part.products)[..., keep])
    for mine, before in zip(into, state):
        np.testing.assert_array_equal(mine[..., want_far], before[..., want_far])
    assert all(not a[..., :3].any() and not a[..., -2:].any() for a in wide)   # nothing outside the window


def test_compiled_far_test_agrees_with_numpy():
    """engine.reduce.polars.far_segments (NumPy) and its one-loop form in fused, on sums about
    shifts near and far from the rows, with empty segments."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    from engine.reduce.polars import far_segments

    rng = np.random.default_rng(4)
    segments = 400
    ids = rng.integers(0, segments - 20, 20_000)
    y = rng.normal(1e6, 1.0, ids.size) + 3e3 * (ids % 7 == 0)     # some segments far from a shift
    x = rng.normal(size=(ids.size, 2))
    shift = np.stack([np.full(segments, 1e6), np.zeros(segments), np.zeros(segments)])
    state, part = (host.accumulate(ids[rows], y[rows], x[rows], segments, shift=shift,
                                   seen=np.ones(segments, bool), passes=host.NUMPY)
                   for rows in (slice(0, 10_000), slice(10_000, None)))
    for tolerance in (1e-11, 1e-13):
        want = far_segments(state, part, tolerance)
        assert 0 < want.sum() < segments - 20
        np.testing.assert_array_equal(fused.far_segments(state, part, tolerance), want)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_a_batch_with_every_shift_known_is_one_counting_pass(k):
    """Where every segment has a shift, the compiled passes count in the deviation pass (no
    first pass): the same bits as a counting first pass and a deviation pass, and an id out of
    range is still refused."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(20 + k)
    ids = rng.integers(0, 30, 300_000)
    y, x = rng.normal(1e9, 1.0, ids.size), rng.normal(size=(ids.size, k))
    shift, seen = np.full((1 + k, 30), 1e9), np.ones(30, bool)
    one = host.accumulate(ids, y, x, 30, shift=shift, seen=seen, passes=fused.PASSES)
    two = host.accumulate(ids, y, x, 30, shift=shift, seen=seen, passes=fused.PASSES._replace(counting=False))
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert one.count.dtype == np.int64 and one.count.sum() == ids.size
    ids[-1] = 30
    with pytest.raises(ValueError, match="segment id 30 is outside"):
        host.accumulate(ids, y, x, 30, shift=shift, seen=seen, passes=fused.PASSES)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_cell_columns_are_the_bits_of_finish_and_stat_columns(k):
    """``fused.cell_columns`` (one loop) gives the columns ``kernels.host.finish`` and
    ``engine.cells.stat_columns`` give, bit for bit, for the cells with rows only, from sums
    about shifts near 1e9 and from views into wider arrays (as a dense run's window)."""
    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    from engine.cells import stat_columns

    rng = np.random.default_rng(40 + k)
    segments, rows = 90, 20_000
    ids = rng.integers(0, segments - 10, rows)                     # the last ten stay empty
    y, x = rng.normal(1e9, 1.0, rows), rng.normal(-3e8, 2.0, (rows, k))
    sums = host.accumulate(ids, y, x, segments, passes=host.NUMPY)
    wide = host.Sums(*(np.concatenate([np.ones(a.shape[:-1] + (4,), a.dtype), a], axis=-1) for a in sums))
    window = host.Sums(*(a[..., 4:] for a in wide))
    present, n, columns = fused.cell_columns(window)
    want = stat_columns(np.flatnonzero(sums.count), *host.finish(sums), [f"x{j}" for j in range(k)])
    np.testing.assert_array_equal(present, np.flatnonzero(sums.count))
    np.testing.assert_array_equal(n, want["n"].to_numpy())
    for j, name in enumerate(want.columns[2:]):
        np.testing.assert_array_equal(columns[:, j], want[name].to_numpy(), err_msg=name)
