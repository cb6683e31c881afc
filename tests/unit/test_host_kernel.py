"""kernels.host: the NumPy corrected two-pass reduction against exact sums, and its merge."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from kernels import host


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
def test_moments_match_exact_sums_at_offset_1e9(threads, chunk_rows, monkeypatch):
    """Mean 1e9, sd 1 (a float64 sum of the raw values is off by ~√n·ε·1e9): the corrected
    two-pass moments equal exact rational ones to a few ulps of the mean and of n·sd²."""
    monkeypatch.setattr(host, "SPLIT_ROWS", 16)
    monkeypatch.setattr(host, "CHUNK_ROWS", chunk_rows)   # 256: passes run in chunks of 256 rows
    rng = np.random.default_rng(0)
    rows, segments = 3_000, 7
    ids = rng.integers(0, segments - 1, rows)         # the last segment stays empty
    y = rng.normal(1e9, 1.0, rows)
    x = np.stack([rng.normal(-3e8, 2.0, rows), rng.normal(0.0, 1e-3, rows)], axis=1)
    got = host.reduce(ids, y, x, segments, threads=threads)
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


def test_split_is_deterministic_and_close_to_one_pass():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 400_000)
    y, x = rng.normal(3.0, 1.0, ids.size), rng.normal(size=(ids.size, 1))
    two = host.reduce(ids, y, x, 50, threads=2)
    assert all(np.array_equal(a, b) for a, b in zip(two, host.reduce(ids, y, x, 50, threads=2)))
    one = host.reduce(ids, y, x, 50, threads=1)
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


def test_out_of_range_segment_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="outside"):
        host.reduce(np.array([0, 5]), np.zeros(2), np.zeros((2, 0)), 3, threads=1)
    with pytest.raises(ValueError, match="rows"):
        host.reduce(np.array([0, 1]), np.zeros(2), np.zeros((3, 1)), 3)
