"""The host reduction's two passes, and the segment ids, each one compiled loop over the rows (Numba).

``kernels.host`` runs the corrected two-pass algorithm with NumPy: every per-segment sum is an
``np.bincount``, so one covariate costs 8 bincounts, 2 gathers and 5 element-wise passes over the
rows, ~7 even when the first pass only counts. Here each pass reads a row once and adds all its
terms into the row's segment: pass 1 the count, Σy and Σx; pass 2 the deviations
d = value − shift[segment] and Σd, Σdᵤd_v. The accumulators are segment-major (one segment's
terms side by side, one or two cache lines a row), and the functions release the GIL, so
``kernels.host``'s thread pool runs its fixed parts side by side as before.

Same statistics and the same guarantees as the NumPy passes: rows add in row order within a part,
parts add in part order, so the same rows give the same bits on every run; the bits differ in the
last places from the NumPy passes, which add in cache-sized chunks.

``segment_ids`` computes the dense route's segments ``2·(key − low) + arm`` from the key and arm
columns as Polars holds them: a Polars expression for it was half of a batch's time at 10⁸ rows.

``PASSES`` is None where Numba is not installed (then ``kernels.host``'s NumPy passes run).
Numba compiles the loops on first use (about a second, once per input dtype) and caches the
machine code next to this file where it can write (``NUMBA_CACHE_DIR`` elsewhere).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_HELPER: dict[int, ThreadPoolExecutor] = {}


def _helper() -> ThreadPoolExecutor:
    """One helper thread for ``segment_ids``' second half (the caller does the first), per
    process: a forked child inherits the executor but not its thread."""
    pid = os.getpid()
    if pid not in _HELPER:
        _HELPER.clear()
        _HELPER[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="causal-engine-segments")
    return _HELPER[pid]

try:
    import numba
except ImportError:   # pragma: no cover - numba is a dependency; the NumPy passes remain
    numba = None


def _first_loop(ids, y, x, acc, with_sums):
    """acc (S, 2 + k): count, Σy, Σx per segment. Returns −1, or the first row whose id is out of range."""
    segments = acc.shape[0]
    k = x.shape[1]
    for i in range(ids.shape[0]):
        s = ids[i]
        if s < 0 or s >= segments:
            return i
        acc[s, 0] += 1.0
        if with_sums:
            acc[s, 1] += y[i]
            for j in range(k):
                acc[s, 2 + j] += x[i, j]
    return -1


def _deviation_loop(ids, y, x, shift, acc):
    """acc (S, c + c(c+1)/2), c = 1 + k: Σd for y and each covariate, then Σdᵤd_v for u ≤ v
    (row-major upper triangle), about ``shift`` (S, c)."""
    c = shift.shape[1]
    d = np.empty(c)
    for i in range(ids.shape[0]):
        s = ids[i]
        d[0] = y[i] - shift[s, 0]
        for j in range(c - 1):
            d[1 + j] = x[i, j] - shift[s, 1 + j]
        t = c
        for a in range(c):
            acc[s, a] += d[a]
            for b in range(a, c):
                acc[s, t] += d[a] * d[b]
                t += 1


def _deviation_loop_0(ids, y, x, shift, acc):
    """``_deviation_loop`` with no covariate, its terms as scalars (3× faster than the loop
    over a runtime column count on machine A)."""
    for i in range(ids.shape[0]):
        s = ids[i]
        dy = y[i] - shift[s, 0]
        acc[s, 0] += dy
        acc[s, 1] += dy * dy


def _deviation_loop_1(ids, y, x, shift, acc):
    """``_deviation_loop`` with one covariate (e.g. a pre-period metric), as scalars."""
    for i in range(ids.shape[0]):
        s = ids[i]
        dy = y[i] - shift[s, 0]
        dx = x[i, 0] - shift[s, 1]
        acc[s, 0] += dy
        acc[s, 1] += dx
        acc[s, 2] += dy * dy
        acc[s, 3] += dy * dx
        acc[s, 4] += dx * dx


def _segment_loop(key, arm, low, out):
    """out[i] = 2·(key[i] − low) + arm[i] in int64. Unsigned keys and ``low`` wrap alike when
    read as int64, so the difference, which is small, comes out right for UInt64 above 2⁶³."""
    for i in range(key.shape[0]):
        out[i] = 2 * (np.int64(key[i]) - low) + np.int64(arm[i])


if numba is not None:
    _jit = numba.njit(nogil=True, cache=True)
    _segment_loop = _jit(_segment_loop)
    _first_loop = _jit(_first_loop)
    _deviation_loop, _deviation_loop_0, _deviation_loop_1 = (
        _jit(_deviation_loop), _jit(_deviation_loop_0), _jit(_deviation_loop_1))
_DEVIATION_LOOPS = {0: _deviation_loop_0, 1: _deviation_loop_1}


_LOCAL = threading.local()


def segment_ids(key: np.ndarray, arm: np.ndarray, low: int) -> np.ndarray:
    """Each row's segment ``2·(key − low) + arm`` (int64), in two halves on two threads, into
    this thread's own buffer (reused by its next call: a fresh array costs page faults)."""
    rows = key.shape[0]
    held = getattr(_LOCAL, "ids", None)
    if held is None or held.shape[0] < rows:
        held = _LOCAL.ids = np.empty(rows, np.int64)
    out = held[:rows]
    low = int(low) - 2**64 if int(low) >= 2**63 else int(low)   # as the loop reads a UInt64 key
    half = rows // 2
    if rows < 1 << 16:
        _segment_loop(key, arm, low, out)
        return out
    done = _helper().submit(_segment_loop, key[:half], arm[:half], low, out[:half])
    _segment_loop(key[half:], arm[half:], low, out[half:])
    done.result()
    return out


def _rows(ids, y, x):
    return (np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(y, np.float64),
            np.ascontiguousarray(x, np.float64))


def first_sums(ids, y, x, num_segments, with_sums=True):
    """``kernels.host._first_sums`` in one loop: the count (S,) int64 and Σy, Σx (k+1, S)."""
    ids, y, x = _rows(ids, y, x)
    acc = np.zeros((num_segments, 2 + x.shape[1]))
    bad = _first_loop(ids, y, x, acc, with_sums)
    if bad >= 0:
        raise ValueError(f"segment id {int(ids[bad])} is outside [0, {num_segments})")
    count = acc[:, 0].astype(np.int64)
    if not with_sums:
        return count, np.zeros((1 + x.shape[1], 0))
    return count, np.ascontiguousarray(acc[:, 1:].T)


def deviation_sums(ids, y, x, first, num_segments):
    """``kernels.host._deviation_sums`` in one loop: Σd (k+1, S) and Σdᵤd_v (k+1, k+1, S)."""
    ids, y, x = _rows(ids, y, x)
    c = 1 + x.shape[1]
    acc = np.zeros((num_segments, c + c * (c + 1) // 2))
    loop = _DEVIATION_LOOPS.get(x.shape[1], _deviation_loop)
    loop(ids, y, x, np.ascontiguousarray(np.asarray(first, np.float64).T), acc)
    sums = np.ascontiguousarray(acc[:, :c].T)
    products = np.empty((c, c, num_segments))
    t = c
    for a in range(c):
        for b in range(a, c):
            products[a, b] = products[b, a] = acc[:, t]
            t += 1
    return sums, products


def _passes():
    if numba is None:
        return None
    from kernels import host
    return host.Passes(first=first_sums, deviations=deviation_sums, chunked=False)


PASSES = _passes()
