"""Group keys → codes 0, 1, 2, … in first-seen order, exactly, by hash tables in compiled loops (Numba).

``engine.reduce.polars``' key codes turn a batch's string (or several) key columns into one
integer code per row, so that the batch takes the dense integer route. Polars' in-memory
group-by over strings took 0.19 s a 2²²-row batch at 100 keys (machine A); a join of 64-bit
hashes against the keys seen so far took 19–133 ms, and comparing every row's string with its
code's (a hash is only a key's stand-in) 11–17 ms more. Here each row's key is looked up by its
bytes, so no check is needed:

- a string column is read as Arrow string views (zero copy from Polars): 16 bytes a row, the
  length and, up to 12 bytes, the whole string, zero-padded; a longer string's view holds its
  first 4 bytes and where the rest lies. A short string is its two 64-bit words; a long one is
  hashed a word at a time and compared byte for byte with the copy the table keeps of each
  long key it holds;
- an integer column (up to 64 bits) is its value's 64 bits;
- several columns are coded one at a time, each step keyed by (codes so far, next column), two
  words; nested string levels instead take the last level's codes while it determines the
  levels above (``Nesting``).

A table is open-addressing with linear probing, slots at a hash's top bits (Fibonacci
hashing). Lookups run in two halves on two threads (the table is only read); keys the table
lacks go in by one serial loop over the rows that missed, in row order, so the codes are the
same on every run (while many keys are new, a part of ``PART_ROWS`` rows at a time). The table
doubles at half full, the long keys' copy when full.

>>> import polars as pl
>>> table = CodeTable()
>>> codes, first = table.strings(pl.Series(["b", "a", "b", "a string longer than twelve bytes"]))
>>> codes.tolist(), first.tolist()
([0, 1, 0, 2], [0, 1, 3])
>>> table.strings(pl.Series(["a string longer than twelve bytes", "c"]))[0].tolist()
[2, 3]
"""
from __future__ import annotations

import numpy as np

from engine.reduce.fused import _prefetch

try:
    import numba
except ImportError:   # pragma: no cover - numba is a dependency; the caller then groups by Polars
    numba = None

_EMPTY = np.uint64(0)          # a slot's third word: 0 for empty, else its code + 1
_LONG = -2                      # a row's code, for now: a long string, not looked up yet
WARM_ROWS = 1 << 16             # a fresh table takes this many rows serially before the first lookup
PART_ROWS = 1 << 18             # rows looked up (two threads) before their misses go in (one): a key new
                                # to the batch is then looked up serially only in its first part, not
                                # in every later row (UUIDs at 10⁶ keys: the serial loop took 0.8 s a batch)
_LOW = np.uint64(0xFFFFFFFF)
_BLOCK = 32                     # rows the blocked loops hash (prefetching) before they probe
FAR_SLOTS = 1 << 16             # from this many slots (1.5 MB, past a core's L2) lookups go in blocks: below,
                                # the probes hit the cache and blocks cost more than they save (100 keys: 45 → 59 ms)
_SHORT = np.uint64(12)          # the longest string a view holds whole
_P1 = np.uint64(0x9E3779B97F4A7C15)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)


def _mix(a, b):
    """Two words → 64 well-mixed bits (the slot is the top bits)."""
    h = a * _P1 + (b ^ (b >> np.uint64(31))) * _P2
    h ^= h >> np.uint64(29)
    return h * _P3


def _short_words(w0, w1, n):
    """A view of n ≤ 12 bytes with whatever lies past the string zeroed: (length | bytes 0–3, bytes 4–11)."""
    if n <= np.uint64(4):
        keep = np.uint64(32) + n * np.uint64(8)
        return (w0 & ((np.uint64(1) << keep) - np.uint64(1)) if keep < np.uint64(64) else w0), np.uint64(0)
    keep = (n - np.uint64(4)) * np.uint64(8)
    return w0, (w1 & ((np.uint64(1) << keep) - np.uint64(1)) if keep < np.uint64(64) else w1)


def _load8(data, at):
    """data[at: at + 8] as a little-endian word. Unsigned indices: Numba then emits no
    wraparound test, and LLVM merges the eight byte loads into one (1.8× faster hashing)."""
    i = np.uint64(at)
    return (np.uint64(data[i]) | (np.uint64(data[i + np.uint64(1)]) << np.uint64(8))
            | (np.uint64(data[i + np.uint64(2)]) << np.uint64(16)) | (np.uint64(data[i + np.uint64(3)]) << np.uint64(24))
            | (np.uint64(data[i + np.uint64(4)]) << np.uint64(32)) | (np.uint64(data[i + np.uint64(5)]) << np.uint64(40))
            | (np.uint64(data[i + np.uint64(6)]) << np.uint64(48)) | (np.uint64(data[i + np.uint64(7)]) << np.uint64(56)))


def _tail(data, start, n):
    """A long string's last n mod 8 bytes (n > 8) as one little-endian word, the rest zero: read
    as the string's last 8 bytes, shifted, so never past its end (its buffer may end there)."""
    rest = n & 7
    if rest == 0:
        return np.uint64(0)
    return _load8(data, start + n - 8) >> np.uint64(8 * (8 - rest))


def _bytes_hash(data, start, n):
    """A long string's n bytes (n > 8), a word at a time."""
    h = np.uint64(n) * _P2
    for i in range(n // 8):
        h = (h ^ _load8(data, start + 8 * i)) * _P1
        h ^= h >> np.uint64(29)
    return _mix(h, _tail(data, start, n))


def _same_bytes(a, a_start, b, b_start, n):
    """Whether two long strings' n bytes (n > 8) are the same."""
    for i in range(n // 8):
        if _load8(a, a_start + 8 * i) != _load8(b, b_start + 8 * i):
            return False
    return _tail(a, a_start, n) == _tail(b, b_start, n)


def _find_words(slots, j, w0, w1):
    """From slot j (the key's home: ``_mix(w0, w1)``'s top bits), the slot holding the key
    (w0, w1), or the empty slot where it would go."""
    mask = slots.shape[0] - 1
    while slots[j, 2] != _EMPTY and not (slots[j, 0] == w0 and slots[j, 1] == w1):
        j = (j + 1) & mask
    return j


def _long_tag(h, n):
    """A long string's first word in the table: the low 32 bits of its hash (not the top bits
    that pick its slot, for tables up to 2³² slots) and
    its length. The length (> 12) tells it from a short key's first word; the hash bits spare
    a byte comparison with the keys the probe passes (keys sharing a length and first bytes,
    such as UUIDs, cost one each and made a lookup 3× slower)."""
    return (h << np.uint64(32)) | np.uint64(n)


def _find_long(slots, arena, shift, h, data, start, n):
    """As ``_find_words`` for a string longer than 12 bytes, of hash h: a slot's second word
    is where the table's copy of its bytes starts in the arena."""
    mask = slots.shape[0] - 1
    tag = _long_tag(h, n)
    j = np.int64(h >> shift)
    while slots[j, 2] != _EMPTY:
        if slots[j, 0] == tag and _same_bytes(arena, np.int64(slots[j, 1]), data, start, n):
            return j
        j = (j + 1) & mask
    return j


def _long_start(w1, starts):
    """Where a long string's bytes start in the buffers' span (``_spanning``): its view's (buffer, offset)."""
    return starts[np.int64(w1 & _LOW)] + np.int64(w1 >> np.uint64(32))


def _loops(strings: bool):
    """The lookup and insert loops over string views (``strings``) or pairs of words, the flag
    a constant of the closure so that Numba compiles each without the other's branches.

    ``keys`` is (rows, 2) uint64 string views, or (rows, 1) the pairs' first words and
    ``second`` (rows,) their second words (unused for strings). Lookup: out[i] = the code of row
    i's key, or −1 where the table lacks it, or −2 for a long string (below); it returns
    (misses, long strings left), row by row, or where ``blocked`` as ``_long_lookup``. Insert
    (always in blocks: its rows are misses): over rows [row, stop), give each row with out[i] = −1
    its key's code, a new one (the next, ``count``) where the table lacks the key, recording
    the row in first[code − base] and a long string's bytes in the arena; it stops before the
    table would pass ``limit`` codes or the arena its size, and returns (the row to resume at,
    or −1 when done; codes; arena bytes used).

    The slot search is written out in each loop, not in a shared helper returning a tuple:
    that way a lookup took 75 ns a row instead of 3; and the lookup leaves long strings
    (out[i] = −2) to ``_long_lookup``: their code in the same loop made short ones 2.7× slower."""

    def lookup(slots, arena, shift, keys, second, data, starts, out, blocked):
        misses, longs = 0, 0
        if not blocked:   # the table is in cache: row by row. The blocked loop's second step with
            # its hash inline, kept apart: one loop with a flag cost 10% at 100 keys (A/B, best of 6)
            for i in range(keys.shape[0]):
                w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
                if strings and (w0 & _LOW) > _SHORT:   # left to ``_long_lookup``
                    out[i] = _LONG
                    longs += 1
                    continue
                if strings:
                    w0, w1 = _short_words(w0, w1, w0 & _LOW)
                j = _find_words(slots, np.int64(_mix(w0, w1) >> shift), w0, w1)
                out[i] = np.int64(slots[j, 2]) - 1
                if slots[j, 2] == _EMPTY:
                    misses += 1
            return misses, longs
        hashes = np.empty(_BLOCK, np.uint64)
        for a in range(0, keys.shape[0], _BLOCK):   # as ``_long_lookup``: hashes first, home slots fetched ahead
            b = min(keys.shape[0], a + _BLOCK)
            for i in range(a, b):
                w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
                if strings and (w0 & _LOW) > _SHORT:
                    continue
                if strings:
                    w0, w1 = _short_words(w0, w1, w0 & _LOW)
                hashes[i - a] = h = _mix(w0, w1)
                _prefetch(slots, 3 * np.int64(h >> shift))
            for i in range(a, b):
                w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
                if strings and (w0 & _LOW) > _SHORT:   # left to ``_long_lookup``
                    out[i] = _LONG
                    longs += 1
                    continue
                if strings:
                    w0, w1 = _short_words(w0, w1, w0 & _LOW)
                j = _find_words(slots, np.int64(hashes[i - a] >> shift), w0, w1)
                out[i] = np.int64(slots[j, 2]) - 1
                if slots[j, 2] == _EMPTY:
                    misses += 1
        return misses, longs

    def insert(slots, arena, shift, keys, second, data, starts, out, row, stop, count, used, limit, base, first):
        hashes = np.empty(_BLOCK, np.uint64)
        for a in range(row, stop, _BLOCK):   # a block's hashes first, their home slots fetched ahead
            b = min(stop, a + _BLOCK)
            for i in range(a, b):
                if out[i] != -1:
                    continue
                w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
                if strings and (w0 & _LOW) > _SHORT:
                    h = _bytes_hash(data, _long_start(w1, starts), np.int64(w0 & _LOW))
                else:
                    if strings:
                        w0, w1 = _short_words(w0, w1, w0 & _LOW)
                    h = _mix(w0, w1)
                hashes[i - a] = h
                _prefetch(slots, 3 * np.int64(h >> shift))
            for i in range(a, b):
                if out[i] != -1:
                    continue
                w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
                h = hashes[i - a]
                n, start = np.int64(0), np.int64(0)
                if strings and (w0 & _LOW) > _SHORT:
                    n, start = np.int64(w0 & _LOW), _long_start(w1, starts)
                    j = _find_long(slots, arena, shift, h, data, start, n)
                    w0 = _long_tag(h, n)
                else:
                    if strings:
                        w0, w1 = _short_words(w0, w1, w0 & _LOW)
                    j = _find_words(slots, np.int64(h >> shift), w0, w1)
                if slots[j, 2] == _EMPTY:
                    if count >= limit or used + n > arena.shape[0]:
                        return i, count, used
                    if n:   # a long string: the table keeps its own copy (a loop: a slice is an allocation)
                        for c in range(n):
                            arena[used + c] = data[start + c]
                        w1 = np.uint64(used)
                        used += n
                    slots[j, 0], slots[j, 1], slots[j, 2] = w0, w1, np.uint64(count + 1)
                    first[count - base] = i
                    count += 1
                out[i] = np.int64(slots[j, 2]) - 1
        return -1, count, used

    if numba is not None:
        lookup, insert = (numba.njit(nogil=True, cache=True)(f) for f in (lookup, insert))
    return lookup, insert


def _long_lookup(slots, arena, shift, keys, second, data, starts, out, blocked):
    """``_loops``' lookup for the rows it left (out[i] = −2, strings longer than 12 bytes):
    (misses, 0). ``second`` is unused (the lookups' arguments).

    ``blocked`` (the caller's choice, from ``FAR_SLOTS`` slots; else row by row): in blocks of
    ``_BLOCK`` rows, three steps, so that a block's cache misses overlap instead of each row
    waiting for its own: hash each row and fetch its home slot ahead; probe to the first slot
    of its tag (or an empty one) and fetch that key's bytes in the arena ahead; then compare
    bytes (a tag shared by another key, rare, falls back to the whole search)."""
    misses = 0
    if not blocked:   # the table is in cache: row by row
        for i in range(keys.shape[0]):
            if out[i] == _LONG:
                n, start = np.int64(keys[i, 0] & _LOW), _long_start(keys[i, 1], starts)
                j = _find_long(slots, arena, shift, _bytes_hash(data, start, n), data, start, n)
                out[i] = np.int64(slots[j, 2]) - 1
                if slots[j, 2] == _EMPTY:
                    misses += 1
        return misses, 0
    mask = slots.shape[0] - 1
    hashes = np.empty(_BLOCK, np.uint64)
    found = np.empty(_BLOCK, np.int64)
    for a in range(0, keys.shape[0], _BLOCK):
        b = min(keys.shape[0], a + _BLOCK)
        for i in range(a, b):
            if out[i] == _LONG:
                n, start = np.int64(keys[i, 0] & _LOW), _long_start(keys[i, 1], starts)
                h = _bytes_hash(data, start, n)
                hashes[i - a] = h
                _prefetch(slots, 3 * np.int64(h >> shift))
        for i in range(a, b):
            if out[i] == _LONG:
                h = hashes[i - a]
                tag = _long_tag(h, keys[i, 0] & _LOW)
                j = np.int64(h >> shift)
                while slots[j, 2] != _EMPTY and slots[j, 0] != tag:
                    j = (j + 1) & mask
                found[i - a] = j
                if slots[j, 2] != _EMPTY:
                    _prefetch(arena, np.int64(slots[j, 1]))
                    _prefetch(arena, np.int64(slots[j, 1] + (keys[i, 0] & _LOW)) - 1)
        for i in range(a, b):
            if out[i] == _LONG:
                n, start = np.int64(keys[i, 0] & _LOW), _long_start(keys[i, 1], starts)
                j = found[i - a]
                if slots[j, 2] != _EMPTY and not _same_bytes(arena, np.int64(slots[j, 1]), data, start, n):
                    j = _find_long(slots, arena, shift, hashes[i - a], data, start, n)
                out[i] = np.int64(slots[j, 2]) - 1
                if slots[j, 2] == _EMPTY:
                    misses += 1
    return misses, 0


def _rehash_loop(slots, arena, shift, strings, new):
    """Every key into the new (larger) table, at the slot its own hash gives there."""
    mask = new.shape[0] - 1
    for s in range(slots.shape[0]):
        if slots[s, 2] == _EMPTY:
            continue
        w0, w1 = slots[s, 0], slots[s, 1]
        n = w0 & _LOW
        if strings and n > _SHORT:
            h = _bytes_hash(arena, np.int64(w1), np.int64(n))
        else:
            h = _mix(w0, w1)
        j = np.int64(h >> shift)
        while new[j, 2] != _EMPTY:
            j = (j + 1) & mask
        new[j, 0], new[j, 1], new[j, 2] = w0, w1, slots[s, 2]


if numba is not None:
    # Helpers as plain compiled functions, which LLVM inlines where it pays: inlined by Numba
    # (``inline="always"``) they ran no faster (1e7 rows, 100–10⁶ keys, best of 6, A/B) and
    # took the tables' first compile from ~5 s to ~2.3 s.
    _mix, _short_words, _load8, _tail, _find_words, _long_start, _long_tag, _bytes_hash, _same_bytes, _find_long = (
        numba.njit(f) for f in (_mix, _short_words, _load8, _tail, _find_words, _long_start, _long_tag, _bytes_hash,
                                _same_bytes, _find_long))
    _long_lookup = numba.njit(nogil=True, cache=True)(_long_lookup)
    _rehash_loop = numba.njit(nogil=True, cache=True)(_rehash_loop)
_LOOPS = {strings: _loops(strings) for strings in (False, True)}


def _in_halves(loop, args, rows):
    """``loop(*args)``'s results: one, or from 2¹⁶ rows two, for the halves run on the caller's
    thread and the reduction's one helper thread (``engine.reduce.fused``'s). The arguments at
    positions ``rows`` are indexed by row and cut in two; the rest are shared, only read, or
    written at rows of one half only."""
    count = args[rows[0]].shape[0]
    if count < 1 << 16:
        return (loop(*args),)
    from engine.reduce.fused import _helper

    half = count // 2
    done = _helper().submit(loop, *(a[:half] if i in rows else a for i, a in enumerate(args)))
    try:
        mine = loop(*(a[half:] if i in rows else a for i, a in enumerate(args)))
    finally:   # waited for even when this half raises (an interrupt): the helper may be reading
        theirs = done.result()   # memory the caller's frame keeps alive, and is then free again
    return mine, theirs


def _spanning(buffers) -> tuple[np.ndarray, np.ndarray]:
    """Arrow data buffers → (one uint8 array over the addresses they span, each buffer's start
    in it), so that the loops read a long string where it lies (a view's offset is into its own
    buffer). The array is not memory of its own: bytes between the buffers are never read, as
    a string's bytes are read only within it (``_load8``, ``_tail``), and the caller holds the
    buffers while the loops run. Joining the buffers instead was a copy of every batch
    (~150 MB at 2²² UUID keys): 25 ms a batch, and 0.1 s of page faults in a fresh table."""
    import ctypes

    held = [buffer for buffer in buffers if buffer is not None and buffer.size]   # an empty one's address
    if not held:                                                                  # may be anything
        return np.empty(0, np.uint8), np.zeros(max(len(buffers), 1), np.int64)
    low = min(buffer.address for buffer in held)
    high = max(buffer.address + buffer.size for buffer in held)
    span = (ctypes.c_uint8 * (high - low)).from_address(low)
    span.buffers = buffers   # the array's base (``frombuffer``) keeps the buffers alive
    starts = [buffer.address - low if buffer is not None and buffer.size else 0 for buffer in buffers]
    return np.frombuffer(span, np.uint8), np.array(starts, np.int64)


class CodeTable:
    """Codes 0, 1, 2, … for keys in the order they first appear, across calls: one table for
    string keys (``strings``) or for pairs of 64-bit words (``pairs``), not both."""

    def __init__(self, bits: int = 10, *, far_slots: int = FAR_SLOTS):
        if not 1 <= bits <= 32:
            raise ValueError(f"CodeTable(bits={bits}): expected 1 to 32 (2 to 2³² slots to start with)")
        self.bits = bits
        self.far_slots = far_slots   # from this many slots the lookups go in blocks (tests: 1, to cover them)
        # (slots, 3) uint64, a slot's words side by side (one cache line a probe, not three:
        # 20% faster at 10⁶ keys): the key's first word (a short string: length | bytes 0–3;
        # a long one: ``_long_tag``), its second (a long string: where the table's copy
        # starts), its code + 1 (0: empty)
        self.slots = np.zeros((1 << bits, 3), np.uint64)
        self.arena = np.empty(0, np.uint8)              # (bytes,) the long strings' copies
        self.used = 0
        self.count = 0
        self.holds_strings = None   # fixed by the first call: True for ``strings``, False for ``pairs``
        self.missing = True         # whether the last call's rows brought many new keys (or none came yet)

    def strings(self, column) -> tuple[np.ndarray, np.ndarray]:
        """A Polars String Series without nulls → (each row's code (rows,) int64, the first
        row of each code new to the table (new,) int64)."""
        import polars as pl

        array = column.to_arrow(compat_level=pl.CompatLevel.newest())   # string views, zero copy
        if str(array.type) not in ("string_view", "binary_view"):   # read as views, anything else is garbage
            raise TypeError(f"CodeTable.strings: Polars gave Arrow {array.type}, expected string_view "
                            "(Polars ≥ 1.0 at CompatLevel.newest())")
        views = np.frombuffer(array.buffers()[1], np.uint64).reshape(-1, 2)[array.offset: array.offset + len(array)]
        data, starts = _spanning(array.buffers()[2:])   # the long strings' bytes, where Arrow keeps them
        if data.size and self.arena.size == 0:
            self.arena = np.empty(1 << 16, np.uint8)
        return self._codes(views, np.empty(0, np.uint64), data, starts, True)

    def pairs(self, first_word: np.ndarray, second_word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows' keys as two integer words each (64-bit ones read as uint64, narrower ones cast:
        either way one word per value) → as ``strings``."""
        first_word, second_word = (np.ascontiguousarray(w).view(np.uint64) if w.dtype.itemsize == 8
                                   else w.astype(np.uint64) for w in (first_word, second_word))
        return self._codes(first_word.reshape(-1, 1), second_word, np.empty(0, np.uint8), np.zeros(1, np.int64), False)

    def _codes(self, keys, second, data, starts, strings):
        """``strings``' and ``pairs``' work: each row's code, and the first row of each new code."""
        if self.holds_strings is None:
            self.holds_strings = strings
        if self.holds_strings != strings:
            raise ValueError("a CodeTable holds strings or pairs of words, not both")
        rows = keys.shape[0]
        out = np.empty(rows, np.int64)
        lookup, insert = _LOOPS[strings]
        before, first = self.count, np.empty(0, np.int64)   # first[c − before]: the first row of new code c
        row = 0
        if self.count == 0:   # a fresh table: its first rows go in serially, so that lookups find most keys
            row = min(rows, WARM_ROWS)
            out[:row] = -1
            first = self._insert(insert, keys, second, data, starts, out, 0, row, before, first)
        part = PART_ROWS if self.missing else rows   # parts only while many keys are new: each costs ~0.2 ms
        while row < rows:   # a lookup on two threads, then the misses serially
            stop = min(rows, row + part)
            if self._lookup(lookup, keys[row:stop], second[row:stop] if second.size else second, data, starts,
                            out[row:stop]):
                first = self._insert(insert, keys, second, data, starts, out, row, stop, before, first)
            row = stop
        self.missing = self.count - before > rows // 64
        return out, first[: self.count - before]

    def _insert(self, insert, keys, second, data, starts, out, row, stop, before, first):
        """``insert`` over rows [row, stop), growing the table and the arena as it asks."""
        while True:
            limit = self.slots.shape[0] // 2
            if first.shape[0] < limit - before:   # room for every code the table can take before it grows
                first = np.concatenate([first, np.empty(limit - before - first.shape[0], np.int64)])
            row, self.count, self.used = insert(self.slots, self.arena, np.uint64(64 - self.bits), keys, second, data,
                                                starts, out, row, stop, self.count, self.used, limit, before, first)
            if row < 0:
                return first
            if self.count >= limit:
                self._grow()
            else:   # the arena is full
                n = int(keys[row, 0] & np.uint64(0xFFFFFFFF))
                self.arena = np.concatenate([self.arena, np.empty(max(self.arena.size, n), np.uint8)])

    def _lookup(self, lookup, keys, second, data, starts, out) -> int:
        """Misses: short keys first, then long strings, each in two halves on two threads."""
        misses, longs = self._halves(lookup, keys, second, data, starts, out)
        if longs:
            misses += self._halves(_long_lookup, keys, second, data, starts, out)[0]
        return misses

    def _halves(self, loop, keys, second, data, starts, out):
        """``loop`` over all rows (two threads from 2¹⁶ rows) → (misses, long strings left)."""
        results = _in_halves(loop, (self.slots, self.arena, np.uint64(64 - self.bits), keys, second, data, starts,
                                    out, self.slots.shape[0] >= self.far_slots), rows=(3, 4, 7))
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def _grow(self) -> None:
        """Double the slots. ``bits`` changes last: the loops index the slots by it, unchecked."""
        new = np.zeros((2 * self.slots.shape[0], 3), np.uint64)
        _rehash_loop(self.slots, self.arena, np.uint64(64 - self.bits - 1), self.holds_strings, new)
        self.slots, self.bits = new, self.bits + 1


def _parent_loop(parent, prefix, codes):
    """The first row i whose parent[codes[i]] is not prefix[i], else −1."""
    for i in range(codes.shape[0]):
        if parent[codes[i]] != prefix[i]:
            return i
    return -1


if numba is not None:
    _parent_loop = numba.njit(nogil=True, cache=True)(_parent_loop)


class Nesting:
    """Whether the last key column determines the columns above it (each region in one
    country), so that its codes can be the whole key's: a dense array of each code's parent
    (the codes of the columns above) replaces a table of pairs, which at 10⁶ keys is another
    48 MB of cache misses a lookup and a serial insert of every new pair.

    >>> import numpy as np
    >>> nesting = Nesting()
    >>> nesting.holds(np.array([5, 5, 7]), np.array([0, 0, 1]), np.array([0, 2]))
    True
    >>> nesting.holds(np.array([7, 5]), np.array([1, 0]), np.array([], np.int64))
    True
    >>> nesting.holds(np.array([5]), np.array([1]), np.array([], np.int64))   # code 1 was under 7
    False
    """

    def __init__(self):
        self.parent = np.empty(0, np.int64)   # (codes,) each last-column code's parent code

    def holds(self, prefix: np.ndarray, codes: np.ndarray, first: np.ndarray) -> bool:
        """Record the parents of the codes new in this batch (``first``: their first rows, in
        code order) and check every row's parent. Once it fails the caller stops asking."""
        self.parent = np.concatenate([self.parent, prefix[first]])
        return all(bad < 0 for bad in _in_halves(_parent_loop, (self.parent, prefix, codes), rows=(1, 2)))
