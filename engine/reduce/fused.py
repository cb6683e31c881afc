"""The host reduction's two passes, the segment ids and the cell merges, each one compiled loop (Numba).

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

From ``DIRECT_SEGMENTS`` segments on, ``direct_sums`` replaces both passes with one: each half of
the rows adds into its own table of one cache line a segment, asking for the line of the row
``AHEAD`` rows on as it goes, and a segment new to the caller sums about its first row (a second
pass only for a segment whose first row lies so far out that rounding would show);
``direct_fold`` adds such a pass into a dense run's arrays in place. A batch whose segments all
have shifts counts its rows in the deviation pass
(``Passes.counting``). Two more loops serve the dense route's callers: ``far_segments`` (the dense
run's test for sums that drifted from their shift) and ``merge_sorted`` (two sorted cell tables
merged by Chan's update without a join, for ``engine.cells.merge_pair``).

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
_HELPER_LOCK = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    """One helper thread for the second half of the loops run in two (the caller does the
    first), per process: a forked child inherits the executor but not its thread. Callers on
    several threads (a threaded Dask worker) share it, their halves queued in turn; the lock
    keeps two first calls from starting two."""
    pid = os.getpid()
    with _HELPER_LOCK:
        if pid not in _HELPER:
            _HELPER.clear()
            _HELPER[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="causal-engine-segments")
        return _HELPER[pid]


def _fresh_lock_in_child() -> None:   # a fork while another thread held the lock would keep it held
    global _HELPER_LOCK
    _HELPER_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)

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


def _deviation_loops(keyed: bool, counting: bool):
    """The deviation pass's loops for one (``keyed``, ``counting``): {0: no covariate, 1: one,
    None: any number}. The flags are constants of the closure, so Numba compiles each variant
    without their branches (as runtime arguments they cost ~20% of the pass on machine A).

    Each loop adds, into acc (S, c + c(c+1)/2 [+ 1]), c = 1 + k: Σd for y and each covariate,
    then Σdᵤd_v for u ≤ v (row-major upper triangle), about ``shift`` (S, c); ``counting``: and
    the rows, last, checking each segment (returns the first bad row, else −1). ``keyed``:
    ``ids`` is the key column and a row's segment is 2·(key − low) + arm, computed here (no
    pass of its own); else ``ids`` are the segments and ``arm``, ``low`` are ignored."""

    def segment(ids, arm, low, i):
        return 2 * (np.int64(ids[i]) - low) + np.int64(arm[i]) if keyed else np.int64(ids[i])

    def out_of_range(acc, s, column):
        """Counting: False after adding the row to segment ``s``'s count in ``column``, True
        (and nothing added) where ``s`` is not a segment. Not counting: False."""
        if not counting:
            return False
        if s < 0 or s >= acc.shape[0]:
            return True
        acc[s, column] += 1.0
        return False

    def general(ids, arm, low, y, x, shift, acc):
        c = shift.shape[1]
        d = np.empty(c)
        last = acc.shape[1] - 1
        for i in range(ids.shape[0]):
            s = segment(ids, arm, low, i)
            if out_of_range(acc, s, last):
                return i
            d[0] = y[i] - shift[s, 0]
            for j in range(c - 1):
                d[1 + j] = x[i, j] - shift[s, 1 + j]
            t = c
            for a in range(c):
                acc[s, a] += d[a]
                for b in range(a, c):
                    acc[s, t] += d[a] * d[b]
                    t += 1
        return -1

    def none(ids, arm, low, y, x, shift, acc):
        # No covariate, the terms as scalars (3× faster than ``general`` on machine A).
        for i in range(ids.shape[0]):
            s = segment(ids, arm, low, i)
            if out_of_range(acc, s, 2):
                return i
            dy = y[i] - shift[s, 0]
            acc[s, 0] += dy
            acc[s, 1] += dy * dy
        return -1

    def one(ids, arm, low, y, x, shift, acc):
        # One covariate (e.g. a pre-period metric), as scalars.
        for i in range(ids.shape[0]):
            s = segment(ids, arm, low, i)
            if out_of_range(acc, s, 5):
                return i
            dy = y[i] - shift[s, 0]
            dx = x[i, 0] - shift[s, 1]
            acc[s, 0] += dy
            acc[s, 1] += dx
            acc[s, 2] += dy * dy
            acc[s, 3] += dy * dx
            acc[s, 4] += dx * dx
        return -1

    if numba is not None:
        segment, out_of_range = (numba.njit(inline="always")(f) for f in (segment, out_of_range))
        general, none, one = (numba.njit(nogil=True, cache=True)(f) for f in (general, none, one))
    return {0: none, 1: one, None: general}


def _segment_loop(key, arm, low, out):
    """out[i] = 2·(key[i] − low) + arm[i] in int64. Unsigned keys and ``low`` wrap alike when
    read as int64, so the difference, which is small, comes out right for UInt64 above 2⁶³."""
    for i in range(key.shape[0]):
        out[i] = 2 * (np.int64(key[i]) - low) + np.int64(arm[i])


if numba is not None:
    _jit = numba.njit(nogil=True, cache=True)
    _segment_loop = _jit(_segment_loop)
    _first_loop = _jit(_first_loop)
_DEVIATION_LOOPS = {(keyed, counting): _deviation_loops(keyed, counting)
                    for keyed in (False, True) for counting in (False, True)}


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


_NO_ARM = np.zeros(0, np.int8)


def deviation_sums(ids, y, x, first, num_segments, counting=False, *, arm=None, low=0):
    """``kernels.host._deviation_sums`` in one loop: Σd (k+1, S) and Σdᵤd_v (k+1, k+1, S);
    ``counting``: the rows per segment (S,) int64 too, first, in the same loop (a batch whose
    segments all have shifts needs no pass of its own to count them). With ``arm``, ``ids`` is
    the key column and the segments are ``2·(key − low) + arm`` (``keyed_sums``)."""
    if arm is None:
        ids, y, x = _rows(ids, y, x)
        arm = _NO_ARM
    else:   # the key column as it is (any integer type); the loop reads it as int64
        y, x = np.ascontiguousarray(y, np.float64), np.ascontiguousarray(x, np.float64)
        given_low = int(low)
        low = int(low) - 2**64 if int(low) >= 2**63 else int(low)   # as a UInt64 key reads
    c = 1 + x.shape[1]
    acc = np.zeros((num_segments, c + c * (c + 1) // 2 + int(counting)))
    loops = _DEVIATION_LOOPS[(arm is not _NO_ARM, bool(counting))]
    loop = loops.get(x.shape[1], loops[None])
    bad = loop(ids, arm, low, y, x, np.ascontiguousarray(np.asarray(first, np.float64).T), acc)
    if bad >= 0:   # checked only when counting: otherwise the first pass checked the ids
        segment = int(ids[bad]) if arm is _NO_ARM else 2 * (int(ids[bad]) - given_low) + int(arm[bad])
        raise ValueError(f"segment id {segment} is outside [0, {num_segments})")
    sums = np.ascontiguousarray(acc[:, :c].T)
    products = np.empty((c, c, num_segments))
    t = c
    for a in range(c):
        for b in range(a, c):
            products[a, b] = products[b, a] = acc[:, t]
            t += 1
    if counting:
        return acc[:, -1].astype(np.int64), sums, products
    return sums, products


def keyed_applies(passes, num_segments: int) -> bool:
    """Whether ``keyed_sums`` may stand in for ``kernels.host.accumulate`` with ``passes``:
    these compiled passes, where they count in the deviation pass and the segments are too few
    for ``direct_sums`` (which reads the key and arm columns itself too)."""
    return passes is PASSES and PASSES is not None and passes.counting and num_segments < DIRECT_SEGMENTS


def keyed_sums(key, arm, low, y, x, shift, num_segments):
    """``kernels.host.accumulate`` for a dense-route batch whose segments all have shifts,
    from the key and arm columns themselves: one counting deviation pass that computes each
    row's segment ``2·(key − low) + arm`` as it goes, with no segment-id array written and read
    back (1e4 groups, 4·2²⁰ rows: 288 → 452 M rows/s with the ids pass on machine A). The rows
    split into ``accumulate``'s parts and add in its order, so the same bits."""
    from kernels import host

    def part(rows):
        return deviation_sums(key[rows], y[rows], x[rows], shift, num_segments, True, arm=arm[rows], low=low)

    return host.counted_sums(host.in_parts(part, host.row_parts(y.shape[0])), shift)


# --- many segments: one packed table a half, its lines fetched ahead ------------------------

#: From this many segments on, ``direct_sums`` stands in for the two passes. Below it the tables
#: stay in L1/L2 and the two routes run even (1e7 rows, 1–10³ groups: 22–26 ms either way on
#: machine A); from here on the direct pass gains, 3·10³ groups 26–28 → 23 ms, 3·10⁴ 38–42 → 29.
DIRECT_SEGMENTS = 1 << 11
#: Rows ahead whose table line ``direct_sums``' loops ask the cache for. A line from L3 or
#: memory takes ~100–300 ns, a row ~2–8: 32–64 rows ahead hide it (machine A, 2·10⁵ and 2·10⁶
#: segments: 5.4 → 2.3 and 18.3 → 8.3 ns a row on two threads).
AHEAD = 48
#: ``direct_sums`` adds each new segment's rows about its first row. It adds them again about
#: their mean where that would leave M2 a relative rounding error above this (the test of
#: ``engine.reduce.polars``' dense run for sums about an old shift, ``far_segments``).
REFINE_TOLERANCE = 1e-11


def _prefetch(array, index):   # pragma: no cover - replaced by the compiled intrinsic below
    """Ask the cache for the line of a C-contiguous array's flat element ``index`` (no wait, no fault)."""


if numba is not None:
    from llvmlite import ir as _ir
    from llvmlite.binding import llvm_version_info as _llvm_version
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic

    # The intrinsic's name carries its pointer type: opaque (LLVM 17 on) or i8* before.
    _PREFETCH = "llvm.prefetch.p0" if _llvm_version[0] >= 17 else "llvm.prefetch.p0i8"

    @_intrinsic
    def _prefetch(typingctx, array, index):   # noqa: F811 - the compiled form of the stub above
        if not (isinstance(array, numba.types.Array) and array.layout == "C"
                and isinstance(index, numba.types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            byte = _ir.IntType(8).as_pointer()
            i32 = _ir.IntType(32)
            signature_ir = _ir.FunctionType(_ir.VoidType(), [byte, i32, i32, i32])
            fn = _cgutils.get_or_insert_function(builder.module, signature_ir, _PREFETCH)
            # read (0), keep in all cache levels (3), data (1)
            builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), byte), i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return numba.types.void(array, index), codegen


# A segment's line in a table: count, the shift (c values), Σd (c), then Σdᵤd_v for u ≤ v
# (row-major upper triangle); c = 1 + k. Padded to 4 or a multiple of 8 values and aligned, so
# that a row touches one cache line (k ≤ 1) or whole lines: 8 values, one line, with one covariate.


def _table_width(c: int) -> int:
    used = 1 + 2 * c + c * (c + 1) // 2
    return 1 << (used - 1).bit_length() if used <= 8 else -(-used // 8) * 8


def _direct_loops(keyed: bool, only: bool):
    """The direct pass's loops {0: no covariate, 1: one, None: any number}: rows a … b into
    ``table`` about each segment's shift; a segment whose shift is NaN takes its row's values
    as its shift first. ``keyed``: ``ids`` is the key column and a row's segment
    2·(key − low) + arm (as in ``_deviation_loops``); ``only``: just the rows of the segments
    marked in ``again``. Both are constants of the closure. Each returns −1, or the first row
    whose segment is out of range."""

    def segment(ids, arm, low, i):
        return 2 * (np.int64(ids[i]) - low) + np.int64(arm[i]) if keyed else np.int64(ids[i])

    def general(ids, arm, low, y, x, a, b, table, again):
        c = 1 + x.shape[1]
        d = np.empty(c)
        for i in range(a, b):
            if i + AHEAD < b:
                _prefetch(table, segment(ids, arm, low, i + AHEAD) * table.shape[1])
            s = segment(ids, arm, low, i)
            if s < 0 or s >= table.shape[0]:
                return i
            if only and not again[s]:
                continue
            if table[s, 1] != table[s, 1]:
                table[s, 1] = y[i]
                for j in range(c - 1):
                    table[s, 2 + j] = x[i, j]
            table[s, 0] += 1.0
            d[0] = y[i] - table[s, 1]
            for j in range(c - 1):
                d[1 + j] = x[i, j] - table[s, 2 + j]
            t = 1 + 2 * c
            for u in range(c):
                table[s, 1 + c + u] += d[u]
                for v in range(u, c):
                    table[s, t] += d[u] * d[v]
                    t += 1
        return -1

    def none(ids, arm, low, y, x, a, b, table, again):
        for i in range(a, b):
            if i + AHEAD < b:
                _prefetch(table, segment(ids, arm, low, i + AHEAD) * table.shape[1])
            s = segment(ids, arm, low, i)
            if s < 0 or s >= table.shape[0]:
                return i
            if only and not again[s]:
                continue
            if table[s, 1] != table[s, 1]:
                table[s, 1] = y[i]
            dy = y[i] - table[s, 1]
            table[s, 0] += 1.0
            table[s, 2] += dy
            table[s, 3] += dy * dy
        return -1

    def one(ids, arm, low, y, x, a, b, table, again):
        for i in range(a, b):
            if i + AHEAD < b:
                _prefetch(table, segment(ids, arm, low, i + AHEAD) * table.shape[1])
            s = segment(ids, arm, low, i)
            if s < 0 or s >= table.shape[0]:
                return i
            if only and not again[s]:
                continue
            if table[s, 1] != table[s, 1]:
                table[s, 1] = y[i]
                table[s, 2] = x[i, 0]
            dy = y[i] - table[s, 1]
            dx = x[i, 0] - table[s, 2]
            table[s, 0] += 1.0
            table[s, 3] += dy
            table[s, 4] += dx
            table[s, 5] += dy * dy
            table[s, 6] += dy * dx
            table[s, 7] += dx * dx
        return -1

    if numba is not None:
        # The prefetch stays in the loops' own bodies: from a helper inlined by Numba it made the
        # loop 10× slower (4·2²⁰ rows, 2·10⁵ segments: 14 → 140 ms).
        segment = numba.njit(inline="always")(segment)
        general, none, one = (numba.njit(nogil=True, cache=True)(f) for f in (general, none, one))
    return {0: none, 1: one, None: general}


_DIRECT_LOOPS = {(keyed, only): _direct_loops(keyed, only) for keyed in (False, True) for only in (False, True)}


def _start_loop(table, a, b, shift, seen):
    """Segments a … b of a table: zero sums, about the caller's shift where ``seen``, else NaN
    (the first row sets it)."""
    c = shift.shape[0]
    for s in range(a, b):
        table[s, :] = 0.0
        if seen[s]:
            for j in range(c):
                table[s, 1 + j] = shift[j, s]
        else:
            table[s, 1] = np.nan


def _rounds_over(n, square, total, tolerance):
    """Whether sums about a shift, Σd = ``total`` and Σd² = ``square`` over n rows, leave the
    sum of squares about the mean a relative rounding above ``tolerance``:
    ε·√n·Σd²/(Σd² − (Σd)²/n), the dense run's test and the direct pass's."""
    return np.finfo(np.float64).eps * np.sqrt(n) * square > tolerance * (square - total * total / n)


def _square_at(c, u):
    """Where Σdᵤ² sits in a table's line (the upper triangle of Σdᵤd_v after count, shift, Σd)."""
    return 1 + 2 * c + u * c - u * (u - 1) // 2


def _rough(table, s, c, tolerance):
    """Whether segment ``s``'s sums in ``table`` (two rows or more) fail ``_rounds_over`` for y
    or a covariate."""
    n = table[s, 0]
    if n < 2.0:
        return False
    for u in range(c):
        if _rounds_over(n, table[s, _square_at(c, u)], table[s, 1 + c + u], tolerance):
            return True
    return False


def _fold_loop(first, second, a, b, seen, refine, again, only, tolerance, count, shift, sums, products, far):
    """Segments a … b of both halves' tables added into ``kernels.host.Sums``' arrays (count,
    shift, sums, products: a dense run's, or zeros). Where the halves' shifts differ (a
    segment not ``seen``, each half about its own first row) the second half's line moves to
    the first's shift first: d' = d + δ with δ = its shift − the first's, so Σd' = Σd + nδ and
    Σd'ᵤd'_v = Σdᵤd_v + δᵤΣd_v + δ_vΣdᵤ + nδᵤδ_v. Segments the tables saw no row of are left as
    they are. ``only``: just the segments marked in ``again``.

    A segment is not added where either test finds the sums' rounding above its tolerance
    (ε·√n·Σd²/(Σd² − (Σd)²/n) for y and each covariate, ``_far_loop``'s test):
    - ``refine`` > 0, a segment not ``seen`` of two rows or more, its sums about its first
      row in either half (each half's own, and the two moved together): marked in ``again``,
      both tables' lines restarted about its rows' mean, for a second pass over its rows;
    - ``tolerance`` > 0, its sums with the arrays' (about the same shift): marked in ``far``,
      for the caller to fold otherwise. Returns whether any segment was marked in ``again``."""
    c = shift.shape[0]
    width = 1 + 2 * c + c * (c + 1) // 2
    more = False
    for s in range(a, b):
        if only and not again[s]:
            continue
        far[s] = False
        n1, n2 = first[s, 0], second[s, 0]
        n = n1 + n2
        if n == 0.0:
            continue
        test = refine > 0.0 and n >= 2.0 and not seen[s]
        # Each half's own sums about its own first row first: once moved to the other half's
        # shift, a far-out first row's rounding no longer shows in them.
        rough = test and (_rough(first, s, c, refine) or _rough(second, s, c, refine))
        if n1 > 0.0 and n2 > 0.0 and not seen[s]:   # the second line to the first's shift
            t = 1 + 2 * c
            for u in range(c):
                for v in range(u, c):
                    du = second[s, 1 + u] - first[s, 1 + u]
                    dv = second[s, 1 + v] - first[s, 1 + v]
                    second[s, t] += du * second[s, 1 + c + v] + dv * second[s, 1 + c + u] + n2 * du * dv
                    t += 1
            for u in range(c):
                second[s, 1 + c + u] += n2 * (second[s, 1 + u] - first[s, 1 + u])
                second[s, 1 + u] = first[s, 1 + u]
        home = first if n1 > 0.0 else second
        if test:
            for u in range(c):   # and the halves together, about the first's shift
                t = _square_at(c, u)
                rough = rough or _rounds_over(n, first[s, t] + second[s, t],
                                              first[s, 1 + c + u] + second[s, 1 + c + u], refine)
            if rough:
                again[s] = more = True
                for u in range(c):
                    mean = home[s, 1 + u] + (first[s, 1 + c + u] + second[s, 1 + c + u]) / n
                    first[s, 1 + u] = second[s, 1 + u] = mean
                for t in range(1 + c, width):
                    first[s, t] = second[s, t] = 0.0
                first[s, 0] = second[s, 0] = 0.0
                continue
        if tolerance > 0.0:
            whole = count[s] + n
            for u in range(c):
                t = _square_at(c, u)
                if _rounds_over(whole, products[u, u, s] + first[s, t] + second[s, t],
                                sums[u, s] + first[s, 1 + c + u] + second[s, 1 + c + u], tolerance):
                    far[s] = True
            if far[s]:
                continue
        count[s] += np.int64(n)
        t = 1 + 2 * c
        for u in range(c):
            shift[u, s] = home[s, 1 + u]
            sums[u, s] += first[s, 1 + c + u] + second[s, 1 + c + u]
            for v in range(u, c):
                products[u, v, s] += first[s, t] + second[s, t]
                if v != u:
                    products[v, u, s] += first[s, t] + second[s, t]
                t += 1
    return more


if numba is not None:
    _rounds_over, _square_at, _rough = (numba.njit(f) for f in (_rounds_over, _square_at, _rough))
    _start_loop, _fold_loop = _jit(_start_loop), _jit(_fold_loop)


class Scratch:
    """Memory for ``direct_sums``' two tables, kept from call to call by whoever holds it (a
    dense run, for its batches): fresh memory costs page faults (2·10⁵ segments, 4·2²⁰ rows:
    13 → 21 ms a call on machine A), and keeping it past the run would hold two lines of
    ``_table_width`` values a segment (2 × 64 bytes with one covariate, 2 × 32 without, 2 × 192
    with three: 1 GB at 8·10⁶ segments and one covariate) for nothing."""

    def __init__(self):
        self.flat = None

    def tables(self, segments: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Two (segments, width) tables on 64-byte lines."""
        size = segments * width
        if self.flat is None or self.flat.shape[0] < 2 * size + 8:
            self.flat = np.empty(2 * size + 8)
        skip = (-self.flat.ctypes.data % 64) // 8
        flat = self.flat[skip:skip + 2 * size]
        return flat[:size].reshape(segments, width), flat[size:].reshape(segments, width)


def _zero_sums(segments: int, c: int):
    """Zeroed (count, shift, sums, products) for ``kernels.host.Sums``, views of one allocation:
    large enough (14 MB at 2·10⁵ segments) for NumPy to ask for huge pages, where four arrays
    of 1.6–6.4 MB took a page fault every 4 kB (~1.5 ms a batch on machine A)."""
    flat = np.zeros(segments * (1 + 2 * c + c * c))
    count = flat[:segments].view(np.int64)
    shift = flat[segments:segments * (1 + c)].reshape(c, segments)
    sums = flat[segments * (1 + c):segments * (1 + 2 * c)].reshape(c, segments)
    products = flat[segments * (1 + 2 * c):].reshape(c, c, segments)
    return count, shift, sums, products


def direct_sums(ids, y, x, num_segments, shift=None, seen=None, *, arm=None, low=0, scratch=None):
    """``kernels.host.accumulate``'s result for many segments, or None below ``DIRECT_SEGMENTS``
    (the caller's passes then run as usual).

    With 10⁴–10⁶ segments the two passes' tables (a shift array and a sums array, ~10 lines a
    row's update touches) outgrow L1/L2 and every row waits on misses. Here each half of the
    rows, on its own thread, adds into its own table of one line a segment (``_table_width``)
    and asks for row i + ``AHEAD``'s line while it adds row i: one pass, its misses overlapped
    (machine A, 4·2²⁰ rows, two threads: 2·10⁵ segments 25 → 13 ms, the rows first put in
    windows of L2-sized tables before).

    As ``accumulate``, the sums come about the caller's ``shift`` where ``seen``; elsewhere about
    the segment's first row, or, where those sums would leave M2 a relative rounding error
    above ``REFINE_TOLERANCE`` (a first row far out in a large segment), about the mean of its
    rows, added again in a second pass over the rows of those segments alone. Each half adds
    its rows in row order and the halves depend on the row count alone, so the bits depend on
    the rows, not on the machine. With ``arm``, ``ids`` is the key column and the segments are
    ``2·(key − low) + arm`` (no id array). ``scratch``: a ``Scratch`` to reuse for the tables.
    """
    if numba is None or num_segments < DIRECT_SEGMENTS:
        return None
    c = 1 + np.shape(x)[1]
    if seen is None:   # as ``kernels.host.accumulate``: no segment has a shift, whatever ``shift`` holds
        shift, seen = np.zeros((c, num_segments)), np.zeros(num_segments, bool)
    into = _zero_sums(num_segments, c)
    np.copyto(into[1], shift, where=seen)   # kept for the caller's segments without rows here too
    _direct(ids, y, x, num_segments, shift, seen, into, 0.0, arm, low, scratch)
    from kernels import host

    return host.Sums(*into)


def direct_fold(ids, y, x, into, tolerance: float, *, arm=None, low=0, scratch=None) -> np.ndarray:
    """``direct_sums`` about ``into``'s shifts where it has rows (``kernels.host.Sums``, e.g. a
    dense run's arrays over the batch's segments, views allowed), added into it in place; a
    segment whose sums, with ``into``'s, fail ``far_segments``' test at ``tolerance`` is left
    as it is and marked in the returned (S,) bool array, for the caller to fold another way.
    The same sums as ``direct_sums`` then ``far_segments`` and an add, without the segment-
    sized arrays in between."""
    return _direct(ids, y, x, into[0].shape[0], into[1], np.asarray(into[0]) > 0, into, tolerance, arm, low,
                   scratch)


def _direct(ids, y, x, num_segments, shift, seen, into, tolerance, arm, low, scratch):
    """``direct_sums``/``direct_fold``: the pass, the refinement, the fold; returns ``far``."""
    given_low = int(low)
    if arm is None:
        ids, y, x = _rows(ids, y, x)
        arm = _NO_ARM
    else:   # the key column as it is (any integer type); the loops read it as int64
        y, x = np.ascontiguousarray(y, np.float64), np.ascontiguousarray(x, np.float64)
        low = int(low) - 2**64 if int(low) >= 2**63 else int(low)   # as a UInt64 key reads
    rows, k = y.shape[0], x.shape[1]
    shift = np.asarray(shift, np.float64)
    seen = np.ascontiguousarray(seen, np.bool_)
    first, second = (scratch or Scratch()).tables(num_segments, _table_width(1 + k))
    rows_at, segments_at = (0, rows // 2, rows), (0, num_segments // 2, num_segments)

    def both(fn, cut, first_args, second_args):
        """fn(*head, lo, hi, *tail) for the two halves of ``cut`` (row or segment bounds), each
        half's (head, tail) given; the first half on the helper thread."""
        done = _helper().submit(fn, *first_args[0], cut[0], cut[1], *first_args[1])
        try:
            here = fn(*second_args[0], cut[1], cut[2], *second_args[1])
        finally:   # never leave the helper writing into the tables after this returns
            there = done.result()
        return there, here

    for table in (first, second):
        both(_start_loop, segments_at, ((table,), (shift, seen)), ((table,), (shift, seen)))
    again = np.zeros(num_segments, np.bool_)
    far = np.empty(num_segments, np.bool_)

    def add(only):
        loops = _DIRECT_LOOPS[(arm is not _NO_ARM, only)]
        loop = loops.get(k, loops[None])
        rows_of = (ids, arm, low, y, x)
        for row in both(loop, rows_at, (rows_of, (first, again)), (rows_of, (second, again))):
            if row >= 0:   # the loops count rows from the start of ``ids``
                segment = int(ids[row]) if arm is _NO_ARM else 2 * (int(ids[row]) - given_low) + int(arm[row])
                raise ValueError(f"segment id {segment} is outside [0, {num_segments})")

    def fold(refine, only):
        args = ((first, second), (seen, refine, again, only, tolerance, *into, far))
        return any(both(_fold_loop, segments_at, args, args))

    add(False)
    if fold(0.0 if seen.all() else REFINE_TOLERANCE, False):
        add(True)
        fold(0.0, True)
    return far


def _cells_loop(present, a, b, count, shift, sums, products, n, out):
    """Rows a … b of the cell table of segments ``present``: n, and the float columns mean, m2,
    x̄ (k), Σxy (k), Σxx (u ≤ v) as ``kernels.host.finish`` computes them, the same operations
    in the same order, so the same bits (ū = shift + Σdᵤ·(1/n); Σ(u − ū)(v − v̄) =
    Σdᵤd_v − (Σdᵤ·Σd_v)·(1/n), sums of squares at least 0)."""
    c = shift.shape[0]
    for i in range(a, b):
        s = present[i]
        n[i] = count[s]
        per = 1.0 / max(count[s], 1)
        out[i, 0] = shift[0, s] + sums[0, s] * per
        out[i, 1] = max(products[0, 0, s] - sums[0, s] * sums[0, s] * per, 0.0)
        t = 2 + 2 * (c - 1)
        for u in range(1, c):
            out[i, 1 + u] = shift[u, s] + sums[u, s] * per
            out[i, c + u] = products[u, 0, s] - sums[u, s] * sums[0, s] * per
            for v in range(u, c):
                centred = products[u, v, s] - sums[u, s] * sums[v, s] * per
                out[i, t] = max(centred, 0.0) if u == v else centred
                t += 1


if numba is not None:
    _cells_loop = _jit(_cells_loop)


def cell_columns(state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``kernels.host.Sums`` → (the segments with rows, their n (int64), their float columns
    (cells, 2 + 2k + k(k+1)/2), Fortran order: mean, m2, x̄, Σxy, Σxx as ``engine.cells``
    orders them): ``kernels.host.finish`` and the gathers of ``engine.cells.stat_columns`` in one
    loop over the cells, in two halves on two threads, without segment-sized temporaries
    (2·10⁶ segments: ~70 ms on machine A, of a 1e7-row reduce's ~230)."""
    count = np.asarray(state.count)
    present = np.flatnonzero(count)
    c = state.shift.shape[0]
    cells = present.shape[0]
    n = np.empty(cells, np.int64)
    out = np.empty((cells, 2 + 2 * (c - 1) + c * (c - 1) // 2), order="F")
    arrays = (count, state.shift, state.sums, state.products, n, out)
    half = cells // 2
    done = _helper().submit(_cells_loop, present, 0, half, *arrays)
    _cells_loop(present, half, cells, *arrays)
    done.result()
    return present, n, out


def _far_loop(count, sums, products, part_count, part_sums, part_products, tolerance, out):
    for g in range(count.shape[0]):
        out[g] = False
        if part_count[g] == 0:
            continue
        n = np.float64(max(count[g] + part_count[g], 1))
        for u in range(sums.shape[0]):
            if _rounds_over(n, products[u, u, g] + part_products[u, u, g], sums[u, g] + part_sums[u, g], tolerance):
                out[g] = True


if numba is not None:
    _far_loop = _jit(_far_loop)


def far_segments(state, part, tolerance):
    """``engine.reduce.polars._DenseRun._far`` in one loop over the segments (its NumPy form
    made ~10 segment-sized temporaries: 57 ms a batch at 2·10⁶ segments on machine A).
    ``state`` and ``part`` are ``kernels.host.Sums`` over the same segments."""
    out = np.empty(state.count.shape[0], np.bool_)
    _far_loop(state.count, state.sums, state.products, part.count, part.sums, part.products, tolerance, out)
    return out


def _merge_loop(slot_a, slot_b, a, b, k, out_slot, out):
    """Two cell tables sorted by slot (strictly increasing) → their union in slot order, the
    cells in both by Chan et al.'s pairwise update, written as ``engine.cells.merge_pair``'s
    expressions are, so the same bits; a side without the cell counts as n = 0 with zero
    statistics. Rows of ``a``, ``b``, ``out``: n, mean, m2, x̄ (k), Σxy (k), Σxx (k(k+1)/2).
    Returns the cells written, or −1 where a table is not strictly increasing."""
    i = j = m = 0
    width = a.shape[1]
    while i < slot_a.shape[0] or j < slot_b.shape[0]:
        if (i + 1 < slot_a.shape[0] and slot_a[i + 1] <= slot_a[i]) or \
                (j + 1 < slot_b.shape[0] and slot_b[j + 1] <= slot_b[j]):
            return -1
        take_a = j >= slot_b.shape[0] or (i < slot_a.shape[0] and slot_a[i] <= slot_b[j])
        take_b = i >= slot_a.shape[0] or (j < slot_b.shape[0] and slot_b[j] <= slot_a[i])
        out_slot[m] = slot_a[i] if take_a else slot_b[j]
        na = a[i, 0] if take_a else 0.0
        nb = b[j, 0] if take_b else 0.0
        total = na + nb
        wb = nb / total
        cross = na * nb / total
        out[m, 0] = na + nb
        for c in range(1, width):
            va = a[i, c] if take_a else 0.0
            vb = b[j, c] if take_b else 0.0
            if c == 1 or (3 <= c < 3 + k):     # means: the other side's where one is absent
                out[m, c] = vb if not take_a else (va if not take_b else va + (vb - va) * wb)
            else:
                out[m, c] = va + vb
        if take_a and take_b:
            dm = b[j, 1] - a[i, 1]
            out[m, 2] += dm ** 2 * cross
            for u in range(k):
                out[m, 3 + k + u] += (b[j, 3 + u] - a[i, 3 + u]) * dm * cross
            t = 3 + 2 * k
            for u in range(k):
                for v in range(u, k):
                    out[m, t] += (b[j, 3 + u] - a[i, 3 + u]) * (b[j, 3 + v] - a[i, 3 + v]) * cross
                    t += 1
        else:   # the join adds (0 − 0)·… = 0.0 there: the same, down to the sign of a zero
            out[m, 2] += 0.0
            for t in range(3 + k, width):
                out[m, t] += 0.0
        i += take_a
        j += take_b
        m += 1
    return m


if numba is not None:
    _merge_loop = _jit(_merge_loop)


def merge_sorted(slot_a, slot_b, a, b, k):
    """``_merge_loop`` → (slots, statistics) of the union, or None where a table's slots are
    not strictly increasing."""
    out_slot = np.empty(slot_a.shape[0] + slot_b.shape[0], np.int64)
    out = np.empty((out_slot.shape[0], a.shape[1]), order="F")   # columns for Polars, no copy
    m = _merge_loop(slot_a, slot_b, a, b, k, out_slot, out)
    return None if m < 0 else (out_slot[:m], out[:m])


def _passes():
    if numba is None:
        return None
    from kernels import host
    return host.Passes(first=first_sums, deviations=deviation_sums, chunked=False, whole=direct_sums,
                       counting=True)


PASSES = _passes()
