"""Rows → per-segment moments on the host, with NumPy: the CPU reduction of the row backends.

The same statistics as ``kernels.segments`` (count, mean, M2 and, with ``k``
covariates, the covariate means, Σ(x − x̄)(y − ȳ) and Σ(x − x̄)(x − x̄)ᵀ), for
rows whose segment ids are dense integers in ``[0, num_segments)``.

How
---
The corrected two-pass algorithm (Chan, Golub & LeVeque 1983, "Algorithms for
computing the sample variance: analysis and recommendations", eq. 1.7), with
every per-segment sum a ``np.bincount``:

1. ``n`` and a first mean ``m₁ = Σy / n`` per segment;
2. per row ``d = y − m₁[segment]``, then ``Σd`` and ``Σd²`` per segment:
   ``ȳ = m₁ + Σd/n`` and ``M2 = Σd² − (Σd)²/n``.

The first mean carries the rounding of a plain float64 sum (about √n·ε·|y|:
2e-4 for four million rows near 1e9); the correction ``Σd/n`` removes it and
the deviations ``d`` are of the order of the spread, so data with mean 1e9
and sd 1 keep their M2 to float64 rounding (tested against exact rational
sums). Covariates go the same way, and the cross moments are
``Σd_x d_y − (Σd_x)(Σd_y)/n``.

Deterministic: ``bincount`` adds in row order, so the same rows give the same
bits. ``reduce`` splits each pass into fixed contiguous parts on a thread pool
(``np.bincount`` and the ufuncs release the GIL) and adds the parts' sums in
part order; the split depends only on the row count, never on the machine.
``merge`` is the pairwise update of finished moments (Chan et al. 1979), for
callers that combine batches.

Cost: one covariate takes 8 ``bincount`` passes, 2 gathers and 5 element-wise
passes over the rows; a ``bincount`` adds ~1.1–2.5 ns a row into ≤ 2·10⁵
segments on machine A (~5 ns at 2·10⁶). See benchmarks/RESULTS.md, "Reduce".
The passes are an argument (``Passes``; ``NUMPY`` by default), so a caller may
bring compiled ones: the engine's polars backend uses ``engine.reduce.fused``,
one Numba loop a pass, 1.4–3× faster (this package imports jax and numpy only).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

#: Rows below which one thread does the whole batch (splitting costs more than it saves).
SPLIT_ROWS = 1 << 18
#: Rows a pass reads at a time when the segments are few (see ``reduce``).
CHUNK_ROWS = 1 << 18


class Moments(NamedTuple):
    """Per-segment moments; every array's first axis is the segment (float64, count int64)."""

    count: np.ndarray   # (S,)
    mean: np.ndarray    # (S,)
    m2: np.ndarray      # (S,)
    x_mean: np.ndarray  # (S, k)
    xy_m2: np.ndarray   # (S, k)
    xx_m2: np.ndarray   # (S, k, k)


def _first_sums(ids, y, x, num_segments, with_sums=True):
    """Pass 1 over some rows: the count, and (``with_sums``) Σy and Σx per segment."""
    count = np.bincount(ids, minlength=num_segments)
    if count.shape[0] > num_segments:
        raise ValueError(f"segment id {int(ids.max())} is outside [0, {num_segments})")
    if not with_sums:
        return count, np.zeros((1 + x.shape[1], 0))
    sums = [np.bincount(ids, y, num_segments)]
    sums += [np.bincount(ids, x[:, j], num_segments) for j in range(x.shape[1])]
    return count, np.stack(sums)


def _deviation_sums(ids, y, x, first, num_segments):
    """Pass 2 over some rows: with d = value − first[segment] for y and each covariate,
    Σd (k+1, S) and the products Σdᵤd_v (k+1, k+1, S), y first."""
    k = x.shape[1]
    columns = [y] + [x[:, j] for j in range(k)]
    buffers = _buffers(ids.shape[0], k + 2)
    scratch = buffers.pop()
    deviations = []
    for column, means, out in zip(columns, first, buffers):
        np.take(means, ids, out=out, mode="clip")  # ids were range-checked; "raise" copies
        deviations.append(np.subtract(column, out, out=out))
    sums = np.stack([np.bincount(ids, d, num_segments) for d in deviations])
    products = np.empty((k + 1, k + 1, num_segments))
    for a in range(k + 1):
        for b in range(a, k + 1):
            products[a, b] = products[b, a] = np.bincount(
                ids, np.multiply(deviations[a], deviations[b], out=scratch), num_segments)
    return sums, products


_LOCAL = threading.local()


def _buffers(rows: int, count: int) -> list[np.ndarray]:
    """``count`` float64 row buffers, this thread's own, reused from call to call.

    Written in place by every pass: a fresh temporary per pass costs ~0.6 ns a row in page
    faults on machine A, as much as the pass itself. A thread keeps the largest it was asked
    for (three buffers of a 2²¹-row half batch with one covariate: 48 MiB).
    """
    held = getattr(_LOCAL, "buffers", [])
    if len(held) < count or held[0].shape[0] < rows:
        held = [np.empty(max(rows, held[0].shape[0] if held else 0)) for _ in range(max(count, len(held)))]
        _LOCAL.buffers = held
    return [b[:rows] for b in held[:count]]


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise update of two partial results over the same segments.

    An empty segment must hold zeros (``reduce`` gives them, and so does zero padding):
    then its side's share is 0 or 1 and the update returns the other side's values exactly.
    """
    count = a.count + b.count
    share = b.count / np.maximum(count, 1)          # 0 where b is empty, 1 where a is
    cross = a.count * share                         # nₐn_b/n
    delta = b.mean - a.mean
    delta_x = b.x_mean - a.x_mean
    mean = a.mean + delta * share
    m2 = a.m2 + b.m2
    m2 += delta * delta * cross
    x_mean = a.x_mean + delta_x * share[:, None]
    weighted = delta_x * cross[:, None]             # δ_x nₐn_b/n
    xy_m2 = a.xy_m2 + b.xy_m2
    xy_m2 += weighted * delta[:, None]
    xx_m2 = a.xx_m2 + b.xx_m2
    xx_m2 += weighted[:, :, None] * delta_x[:, None, :]
    return Moments(count, mean, m2, x_mean, xy_m2, xx_m2)


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="causal-engine-reduce")
        return _POOLS[threads]


def _forget_pools() -> None:
    # A forked child inherits the pool objects but not their threads.
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


class Passes(NamedTuple):
    """The two passes over some rows, as functions: ``first(ids, y, x, num_segments, with_sums)``
    → (count (S,), Σy and Σx (k+1, S)) and ``deviations(ids, y, x, first_means, num_segments)``
    → (Σd (k+1, S), Σdᵤd_v (k+1, k+1, S)). ``chunked``: run them over cache-sized chunks when
    the segments are few (for passes that make row-sized temporaries). The default, ``NUMPY``,
    is ``np.bincount``; a caller may bring compiled ones (``engine.reduce.fused``)."""

    first: object
    deviations: object
    chunked: bool
    #: Optional ``(ids, y, x, num_segments, shift, seen)`` → ``Sums`` or None: the whole of
    #: ``accumulate`` done another way where it chooses to (e.g. one pass that fetches its
    #: tables' lines ahead when the segments are many); None declines and the two passes run.
    whole: object = None
    #: ``deviations`` also takes a trailing ``counting`` flag and then returns (count (S,),
    #: Σd, Σdᵤd_v): a batch whose segments all have shifts is then one pass, not two.
    counting: bool = False


class Sums(NamedTuple):
    """Deviation sums about a per-segment shift: additive over rows that share the shift.

    ``shift`` and ``sums`` are (k+1, S), y first then the covariates; ``products`` is
    (k+1, k+1, S), Σ dᵤ d_v; ``count`` (S,) int64. ``finish`` turns them into moments.
    """

    count: np.ndarray
    shift: np.ndarray
    sums: np.ndarray
    products: np.ndarray


NUMPY = Passes(first=_first_sums, deviations=_deviation_sums, chunked=True)


def reduce(segment_ids: np.ndarray, y: np.ndarray, x: np.ndarray, num_segments: int, *,
           threads: int = 2, passes: Passes = NUMPY) -> Moments:
    """Moments of the rows; each pass split into ``threads`` fixed contiguous parts.

    Both passes add the parts' per-segment sums in part order, and the split depends only
    on the row count, so the result is the same bits on any machine; the second pass's
    deviations are from the first pass's means *of all the rows*, so splitting costs no
    precision (merging finished moments instead would round the difference of two means
    near 1e9 to ~1e-7). ``threads=1`` adds in one pass; its bits differ in the last places.
    """
    return finish(accumulate(segment_ids, y, x, num_segments, threads=threads, passes=passes))


def accumulate(segment_ids: np.ndarray, y: np.ndarray, x: np.ndarray, num_segments: int, *,
               shift: np.ndarray | None = None, seen: np.ndarray | None = None, threads: int = 2,
               passes: Passes = NUMPY) -> Sums:
    """The rows' deviation sums about ``shift`` (k+1, S) where ``seen`` (S,) is true, and about
    these rows' own first-pass means elsewhere (the corrected two-pass algorithm).

    A caller folding batches passes its running shifts and which segments have one, then
    adds the returned sums to its own (``Sums`` over one shift are additive): no merge of
    finished moments. Where every segment is ``seen`` the first pass only counts.
    """
    rows = len(y)
    if x.ndim != 2 or x.shape[0] != rows or len(segment_ids) != rows:
        raise ValueError(f"y has {rows} rows, x {x.shape}, segment_ids {len(segment_ids)}: expected "
                         "y (rows,), x (rows, k) and segment_ids (rows,)")
    ids, y = np.asarray(segment_ids), np.asarray(y, np.float64)
    x = np.asarray(x, np.float64)
    if passes.whole is not None and threads > 1:
        done = passes.whole(ids, y, x, num_segments, shift, seen)
        if done is not None:
            return done
    slices = row_parts(rows, threads)

    # Few segments: each part runs its passes chunk by chunk, so the row temporaries stay in
    # the cache (25% faster at 200 segments on machine A); the chunks' sums add in order.
    chunk = CHUNK_ROWS if passes.chunked and num_segments * 8 <= CHUNK_ROWS else max(rows, 1)

    def over(fn, part, *args):
        start, stop = part.start, part.stop
        cuts = [(i, min(i + chunk, stop)) for i in range(start, max(stop, start + 1), chunk)]
        sums = [fn(ids[a:b], y[a:b], x[a:b], *args) for a, b in cuts]
        return tuple(_ordered_sum([c[j] for c in sums]) for j in range(len(sums[0])))

    def each(fn, *args):
        return in_parts(lambda part: over(fn, part, *args), slices)

    everywhere = seen is not None and bool(np.all(seen))
    if everywhere and passes.counting:   # every shift known: count in the deviation pass
        return counted_sums(each(passes.deviations, shift, num_segments, True), shift)
    first = each(passes.first, num_segments, not everywhere)
    count = _ordered_sum([c for c, _ in first])
    if everywhere:
        means = shift
    else:
        means = _ordered_sum([s for _, s in first]) / np.maximum(count, 1)
        if seen is not None:
            means = np.where(seen, shift, means)
    second = each(passes.deviations, means, num_segments)
    return Sums(count, means, _ordered_sum([s for s, _ in second]), _ordered_sum([p for _, p in second]))


def row_parts(rows: int, threads: int = 2) -> list[slice]:
    """The fixed contiguous parts a pass over ``rows`` splits into: one below ``SPLIT_ROWS``,
    else ``threads`` equal ones. It depends on the row count only, never on the machine."""
    parts = 1 if threads <= 1 or rows < SPLIT_ROWS else threads
    bounds = np.linspace(0, rows, parts + 1).astype(np.int64)
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def in_parts(fn, slices: list[slice]) -> list:
    """``fn(part)`` for each part, on the thread pool where there are several, in part order."""
    if len(slices) == 1:
        return [fn(slices[0])]
    return list(_pool(len(slices)).map(fn, slices))


def counted_sums(parts, shift: np.ndarray) -> Sums:
    """``Sums`` about ``shift`` from each part's (count, Σd, Σdᵤd_v) of a counting deviation
    pass (``Passes.counting``), added in part order."""
    return Sums(_ordered_sum([c for c, _, _ in parts]), shift, _ordered_sum([s for _, s, _ in parts]),
                _ordered_sum([p for _, _, p in parts]))


def finish(s: Sums) -> Moments:
    """Corrected two-pass: ū = shift + Σdᵤ/n and Σ(u − ū)(v − v̄) = Σdᵤd_v − (Σdᵤ)(Σd_v)/n."""
    per = 1.0 / np.maximum(s.count, 1)
    # products − (Σdᵤ·Σd_v)·per in one temporary, not three: each is ~32 bytes a segment, and
    # fresh memory costs page faults (a 1M-row reduce at 650k string keys: 0.20–0.26 → 0.18 s).
    centred = np.multiply(s.sums[:, None, :], s.sums[None, :, :])
    centred = np.multiply(centred, per, out=centred if centred.dtype == np.float64 else None)
    centred = np.subtract(s.products, centred, out=centred if s.products.dtype == np.float64 else None)
    mean = s.shift + s.sums * per
    k = s.sums.shape[0] - 1
    diagonal = np.arange(k + 1)
    centred[diagonal, diagonal] = np.maximum(centred[diagonal, diagonal], 0.0)   # sums of squares
    return Moments(count=s.count, mean=mean[0], m2=centred[0, 0],
                   x_mean=np.ascontiguousarray(mean[1:].T), xy_m2=np.ascontiguousarray(centred[1:, 0].T),
                   xx_m2=np.ascontiguousarray(centred[1:, 1:].transpose(2, 0, 1)))


def as_sums(m: Moments) -> Sums:
    """Finished moments as ``Sums`` about their own means (Σd = 0): the inverse of ``finish``."""
    k = m.x_mean.shape[1]
    products = np.empty((k + 1, k + 1, m.count.shape[0]))
    products[0, 0] = m.m2
    products[0, 1:] = products[1:, 0] = m.xy_m2.T
    products[1:, 1:] = m.xx_m2.transpose(1, 2, 0)
    shift = np.concatenate([m.mean[None, :], m.x_mean.T])
    return Sums(m.count.copy(), shift, np.zeros_like(shift), products)


def _ordered_sum(parts):
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total
