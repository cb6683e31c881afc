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

From ``PARTITION_SEGMENTS`` segments on, ``partitioned_sums`` first puts a batch's rows in windows
of 2^``WINDOW_BITS`` segments, so that both passes run in tables that fit in L2 (1.5–2.5× at
10⁵–10⁶ groups). A batch whose segments all have shifts counts its rows in the deviation pass
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
        low = int(low) - 2**64 if int(low) >= 2**63 else int(low)   # as a UInt64 key reads
    c = 1 + x.shape[1]
    acc = np.zeros((num_segments, c + c * (c + 1) // 2 + int(counting)))
    loops = _DEVIATION_LOOPS[(arm is not _NO_ARM, bool(counting))]
    loop = loops.get(x.shape[1], loops[None])
    bad = loop(ids, arm, low, y, x, np.ascontiguousarray(np.asarray(first, np.float64).T), acc)
    if bad >= 0:   # checked only when counting: otherwise the first pass checked the ids
        segment = int(ids[bad]) if arm is _NO_ARM else 2 * (int(ids[bad]) - low) + int(arm[bad])
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
    these compiled passes, where they count in the deviation pass and would not reorder the
    rows in windows (there, random access to many segments costs more than the ids pass)."""
    return passes is PASSES and PASSES is not None and passes.counting and num_segments < PARTITION_SEGMENTS


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


# --- many segments: rows in window order first ----------------------------------------------

#: Segments a window covers: its tables (count and sums, then shifts and deviation sums; ~80
#: bytes a segment with one covariate) stay in the core's L2 cache. At most 16: a row's offset in
#: its window is kept in 16 bits.
WINDOW_BITS = 12
#: From this many segments on, ``partitioned_sums`` puts the rows in window order first. Below it
#: the whole tables stay in cache anyway and the reordering would cost more than it saves.
PARTITION_SEGMENTS = 1 << 17


def _histogram_loop(ids, bits, segments, counts):
    """counts[w] += rows of window w (= id >> bits). Returns −1, or the first row whose id is
    out of range."""
    for i in range(ids.shape[0]):
        s = ids[i]
        if s < 0 or s >= segments:
            return i
        counts[s >> bits] += 1
    return -1


def _scatter_loop(ids, y, x, bits, cursor, cell, values):
    """Rows to window order, stably: row i goes to row cursor[window], which then moves on, as
    its id's offset within the window (``cell``, uint16) and its values (``values``: y, x): one
    stream of each a window. Two bytes for the offset, not eight as a float beside the values:
    1.26× for the scatter and the window passes together (2·10⁵ cells, machine A, session 14)."""
    mask = (1 << bits) - 1
    k = x.shape[1]
    for i in range(ids.shape[0]):
        s = ids[i]
        w = s >> bits
        j = cursor[w]
        cursor[w] = j + 1
        cell[j] = s & mask
        values[j, 0] = y[i]
        for c in range(k):
            values[j, 1 + c] = x[i, c]


# A window's table, one row a segment: count, the shift (c values), Σd (c), then Σdᵤd_v for
# u ≤ v (row-major upper triangle); c = 1 + k. One covariate: 8 values, one cache line.


def _records_loop(cell, values, a, b, table, only):
    """Rows a … b of the window's records into its table, about each segment's shift; a segment
    whose shift is NaN takes its first row's values as the shift. ``only``: where not all
    False, just the rows of the segments marked there (a second pass)."""
    c = values.shape[1]
    d = np.empty(c)
    some = False
    for s in range(only.shape[0]):
        some = some or only[s]
    for i in range(a, b):
        s = np.int64(cell[i])
        if some and not only[s]:
            continue
        if table[s, 1] != table[s, 1]:
            for j in range(c):
                table[s, 1 + j] = values[i, j]
        table[s, 0] += 1.0
        for j in range(c):
            d[j] = values[i, j] - table[s, 1 + j]
        t = 1 + 2 * c
        for u in range(c):
            table[s, 1 + c + u] += d[u]
            for v in range(u, c):
                table[s, t] += d[u] * d[v]
                t += 1


def _records_loop_1(cell, values, a, b, table, only):
    """``_records_loop`` for one covariate, its terms as scalars (the common case, ~2× faster)."""
    some = False
    for s in range(only.shape[0]):
        some = some or only[s]
    for i in range(a, b):
        s = np.int64(cell[i])
        if some and not only[s]:
            continue
        if table[s, 1] != table[s, 1]:
            table[s, 1] = values[i, 0]
            table[s, 2] = values[i, 1]
        dy = values[i, 0] - table[s, 1]
        dx = values[i, 1] - table[s, 2]
        table[s, 0] += 1.0
        table[s, 3] += dy
        table[s, 4] += dx
        table[s, 5] += dy * dy
        table[s, 6] += dy * dx
        table[s, 7] += dx * dx


def _window_loop(cell, values, starts, first_window, last_window, bits, segments, shift, seen,
                 count, shifts, sums, products):
    """Windows [first_window, last_window): the corrected two-pass algorithm over each window's
    records, into a table of its segments alone (``_records_loop``), then the window's segments
    into the outputs. Pass 1 adds each row about the caller's shift where ``seen`` (and that is
    all those segments need) and about the segment's first row elsewhere, which gives a mean
    good to the rounding of the spread, not of the level; pass 2, over the rows of the segments
    not ``seen`` that have two rows or more, adds them again about that mean."""
    width = 1 << bits
    c = values.shape[1]
    table = np.zeros((width, 1 + 2 * c + c * (c + 1) // 2))
    again = np.zeros(width, np.bool_)
    for w in range(first_window, last_window):
        a, b = starts[w], starts[w + 1]
        base = w << bits
        span = min(width, segments - base)
        for s in range(span):
            table[s, :] = 0.0
            again[s] = False
            if seen[base + s]:
                for j in range(c):
                    table[s, 1 + j] = shift[j, base + s]
            else:
                table[s, 1] = np.nan
        for second in range(2):
            if c == 2:
                _records_loop_1(cell, values, a, b, table, again[:span])
            else:
                _records_loop(cell, values, a, b, table, again[:span])
            if second:
                break
            more = False
            for s in range(span):
                n = table[s, 0]
                if n >= 2.0 and not seen[base + s]:
                    again[s] = more = True
                    for j in range(c):     # the shift becomes the mean; the sums start again
                        table[s, 1 + j] += table[s, 1 + c + j] / n
                    for t in range(1 + c, table.shape[1]):
                        table[s, t] = 0.0
                    table[s, 0] = 0.0
            if not more:
                break
        for s in range(span):
            g = base + s
            count[g] = np.int64(table[s, 0])
            t = 1 + 2 * c
            for u in range(c):
                value = table[s, 1 + u]
                shifts[u, g] = 0.0 if value != value else value   # an empty segment's is NaN
                sums[u, g] = table[s, 1 + c + u]
                for v in range(u, c):
                    products[u, v, g] = table[s, t]
                    products[v, u, g] = table[s, t]
                    t += 1


if numba is not None:
    _histogram_loop, _scatter_loop, _records_loop, _records_loop_1 = (
        _jit(_histogram_loop), _jit(_scatter_loop), _jit(_records_loop), _jit(_records_loop_1))
    _window_loop = _jit(_window_loop)


def _records(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's reordered rows: each one's offset in its window (rows,) uint16 and values
    (rows, 1 + k), reused from call to call (fresh arrays cost page faults)."""
    held = getattr(_LOCAL, "records", None)
    if held is None or held[0].shape[0] < rows or held[1].shape[1] != 1 + k:
        held = _LOCAL.records = (np.empty(rows, np.uint16), np.empty((rows, 1 + k)))
    return held[0][:rows], held[1][:rows]


def partitioned_sums(ids, y, x, num_segments, shift=None, seen=None):
    """``kernels.host.accumulate``'s result for many segments, or None below
    ``PARTITION_SEGMENTS`` (the caller's passes then run as usual).

    With 10⁵–10⁶ segments the passes' tables (~80 bytes a segment with one covariate, one per
    thread) outgrow the caches, and every row costs a miss. Here the rows are first put in
    window order (``WINDOW_BITS``: 4096 segments a window), stably (a histogram, then a scatter,
    both in two halves on two threads), then each thread takes whole windows and runs the
    corrected two-pass algorithm over a window's rows into tables of its segments alone
    (``_window_loop``: the first pass about each segment's first row, so the means it gives are
    good to the rounding of the spread; the second about those means). As ``accumulate``, the
    sums come about the caller's ``shift`` where ``seen`` and about the rows' own means elsewhere.
    Each segment's rows are added by one thread in row order, so the bits do not depend on the
    threads, only on the rows.
    """
    if numba is None or num_segments < PARTITION_SEGMENTS:
        return None
    from kernels import host

    ids, y, x = _rows(ids, y, x)
    rows, k = y.shape[0], x.shape[1]
    c = 1 + k
    if shift is None:
        shift, seen = np.zeros((c, num_segments)), np.zeros(num_segments, bool)
    shift = np.ascontiguousarray(shift, np.float64)
    seen = np.ascontiguousarray(seen, np.bool_)
    if not 0 <= WINDOW_BITS <= 16:
        raise ValueError(f"WINDOW_BITS {WINDOW_BITS}: expected 0 to 16 (offsets are kept in 16 bits)")
    windows = ((num_segments - 1) >> WINDOW_BITS) + 1
    half = rows // 2
    halves = [(0, half), (half, rows)]
    counts = np.zeros((2, windows), np.int64)

    def both(fn, *args_of_half):
        done = _helper().submit(fn, *args_of_half[0])
        second = fn(*args_of_half[1])
        return done.result(), second

    bad = both(_histogram_loop, *[(ids[a:b], WINDOW_BITS, num_segments, counts[h])
                                  for h, (a, b) in enumerate(halves)])
    for h, row in enumerate(bad):
        if row >= 0:
            at = halves[h][0] + row
            raise ValueError(f"segment id {int(ids[at])} is outside [0, {num_segments})")
    # Window-major, the first half's rows before the second's within a window: stable.
    starts = np.zeros(windows + 1, np.int64)
    np.cumsum(counts.sum(axis=0), out=starts[1:])
    cursors = np.stack([starts[:-1], starts[:-1] + counts[0]])
    cell, values = _records(rows, k)
    both(_scatter_loop, *[(ids[a:b], y[a:b], x[a:b], WINDOW_BITS, cursors[h], cell, values)
                          for h, (a, b) in enumerate(halves)])

    count = np.empty(num_segments, np.int64)
    shifts, sums = np.empty((c, num_segments)), np.empty((c, num_segments))
    products = np.empty((c, c, num_segments))
    cut = int(np.searchsorted(starts, rows / 2))        # windows split where the rows halve
    both(_window_loop, *[(cell, values, starts, lo, hi, WINDOW_BITS, num_segments, shift, seen,
                          count, shifts, sums, products) for lo, hi in ((0, cut), (cut, windows))])
    return host.Sums(count, shifts, sums, products)


def _far_loop(count, sums, products, part_count, part_sums, part_products, tolerance, out):
    eps = np.finfo(np.float64).eps
    for g in range(count.shape[0]):
        out[g] = False
        if part_count[g] == 0:
            continue
        n = max(count[g] + part_count[g], 1)
        for u in range(sums.shape[0]):
            total = sums[u, g] + part_sums[u, g]
            square = products[u, u, g] + part_products[u, u, g]
            if eps * np.sqrt(n) * square > tolerance * (square - total * total / n):
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
    return host.Passes(first=first_sums, deviations=deviation_sums, chunked=False, partitioned=partitioned_sums,
                       counting=True)


PASSES = _passes()
