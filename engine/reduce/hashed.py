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
  compared byte for byte with the copy the table keeps of each long key it holds;
- an integer column is its value's 64 bits;
- several columns are coded one at a time, each step keyed by (codes so far, next column), two
  words.

A table is open-addressing with linear probing, slots at a hash's top bits (Fibonacci
hashing). Lookups run in two halves on two threads (the table is only read); keys the table
lacks go in by one serial loop over the rows that missed, in row order, so the codes are the
same on every run. The table doubles at half full, the long keys' copy when full.

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

try:
    import numba
except ImportError:   # pragma: no cover - numba is a dependency; the caller then groups by Polars
    numba = None

_EMPTY = np.uint64(0)          # a slot's third word: 0 for empty, else its code + 1
_LOW = np.uint64(0xFFFFFFFF)
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


def _bytes_hash(data, start, n):
    h = np.uint64(n) * _P2
    for i in range(n):
        h = (h ^ np.uint64(data[start + i])) * _P1
        h ^= h >> np.uint64(27)
    return _mix(h, np.uint64(n))


def _find_words(slots, shift, w0, w1):
    """The slot holding the key (w0, w1), or the empty slot where it would go."""
    mask = slots.shape[0] - 1
    j = np.int64(_mix(w0, w1) >> shift)
    while slots[j, 2] != _EMPTY and not (slots[j, 0] == w0 and slots[j, 1] == w1):
        j = (j + 1) & mask
    return j


def _find_long(slots, arena, shift, w0, data, start, n):
    """As ``_find_words`` for a string longer than 12 bytes: w0 is its length and first 4
    bytes, and a slot's second word is where the table's copy of its bytes starts in the arena."""
    mask = slots.shape[0] - 1
    j = np.int64(_bytes_hash(data, start, n) >> shift)
    while slots[j, 2] != _EMPTY:
        if slots[j, 0] == w0:
            at = np.int64(slots[j, 1])
            same = True
            for i in range(n):
                if arena[at + i] != data[start + i]:
                    same = False
                    break
            if same:
                return j
        j = (j + 1) & mask
    return j


def _long_start(w1, starts):
    """Where a long string's bytes start in the joined data buffers: its view's (buffer, offset)."""
    return starts[np.int64(w1 & _LOW)] + np.int64(w1 >> np.uint64(32))


def _loops(strings: bool):
    """The lookup and insert loops over string views (``strings``) or pairs of words, the flag
    a constant of the closure so that Numba compiles each without the other's branches.

    ``keys`` is (rows, 2) uint64 string views, or (rows, 1) the pairs' first words and
    ``second`` (rows,) their second words (unused for strings). Lookup: out[i] = the code of row
    i's key, or −1 where the table lacks it; returns the misses. Insert: from ``row`` on, give
    each row with out[i] = −1 its key's code, a new one (the next, ``count``) where the table
    lacks the key, recording the row in first[code − base] and a long string's bytes in the
    arena; it stops before the table would pass ``limit`` codes or the arena its size, and
    returns (the row to resume at, or −1 when done; codes; arena bytes used).

    The slot search is written out in each loop, not in a shared helper returning a tuple:
    that way (Numba, inlined) a lookup took 75 ns a row instead of 3."""

    def lookup(slots, arena, shift, keys, second, data, starts, out):
        misses = 0
        for i in range(keys.shape[0]):
            w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
            if strings and (w0 & _LOW) > _SHORT:
                j = _find_long(slots, arena, shift, w0, data, _long_start(w1, starts), np.int64(w0 & _LOW))
            else:
                if strings:
                    w0, w1 = _short_words(w0, w1, w0 & _LOW)
                j = _find_words(slots, shift, w0, w1)
            out[i] = np.int64(slots[j, 2]) - 1
            if slots[j, 2] == _EMPTY:
                misses += 1
        return misses

    def insert(slots, arena, shift, keys, second, data, starts, out, row, count, used, limit, base, first):
        for i in range(row, keys.shape[0]):
            if out[i] != -1:
                continue
            w0, w1 = keys[i, 0], (keys[i, 1] if strings else second[i])
            n, start = np.int64(0), np.int64(0)
            if strings and (w0 & _LOW) > _SHORT:
                n, start = np.int64(w0 & _LOW), _long_start(w1, starts)
                j = _find_long(slots, arena, shift, w0, data, start, n)
            else:
                if strings:
                    w0, w1 = _short_words(w0, w1, w0 & _LOW)
                j = _find_words(slots, shift, w0, w1)
            if slots[j, 2] == _EMPTY:
                if count >= limit or used + n > arena.shape[0]:
                    return i, count, used
                if n:   # a long string: the table keeps its own copy
                    arena[used: used + n] = data[start: start + n]
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
    _inline = numba.njit(inline="always")
    _mix, _short_words, _bytes_hash, _find_words, _long_start = (
        _inline(f) for f in (_mix, _short_words, _bytes_hash, _find_words, _long_start))
    _find_long = numba.njit(_find_long)   # a call: only long strings take it
    _rehash_loop = numba.njit(nogil=True, cache=True)(_rehash_loop)
_LOOPS = {strings: _loops(strings) for strings in (False, True)}


class CodeTable:
    """Codes 0, 1, 2, … for keys in the order they first appear, across calls: one table for
    string keys (``strings``) or for pairs of 64-bit words (``pairs``), not both."""

    def __init__(self, bits: int = 10):
        self.bits = bits
        # (slots, 3) uint64, a slot's words side by side (one cache line a probe, not three:
        # 20% faster at 10⁶ keys): the key's first word (a string: length | bytes 0–3), its
        # second (a long string: where the table's copy starts), its code + 1 (0: empty)
        self.slots = np.zeros((1 << bits, 3), np.uint64)
        self.arena = np.empty(0, np.uint8)              # (bytes,) the long strings' copies
        self.used = 0
        self.count = 0
        self.holds_strings = None   # fixed by the first call: True for ``strings``, False for ``pairs``

    def strings(self, column) -> tuple[np.ndarray, np.ndarray]:
        """A Polars String Series without nulls → (each row's code (rows,) int64, the first
        row of each code new to the table (new,) int64)."""
        import polars as pl

        array = column.to_arrow(compat_level=pl.CompatLevel.newest())   # string views, zero copy
        views = np.frombuffer(array.buffers()[1], np.uint64).reshape(-1, 2)[array.offset: array.offset + len(array)]
        parts = [np.frombuffer(b, np.uint8) for b in array.buffers()[2:]]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, np.uint8)
        starts = np.cumsum([0] + [p.size for p in parts[:-1]]).astype(np.int64)
        if parts and self.arena.size == 0:
            self.arena = np.empty(1 << 16, np.uint8)
        return self._codes(views, np.empty(0, np.uint64), data, starts, True)

    def pairs(self, first_word: np.ndarray, second_word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows' keys as two integer words each (64-bit ones read as uint64, narrower ones cast:
        either way one word per value) → as ``strings``."""
        first_word, second_word = (np.ascontiguousarray(w).view(np.uint64) if w.dtype.itemsize == 8
                                   else w.astype(np.uint64) for w in (first_word, second_word))
        return self._codes(first_word.reshape(-1, 1), second_word, np.empty(0, np.uint8), np.zeros(1, np.int64), False)

    def _codes(self, keys, second, data, starts, strings):
        if self.holds_strings is None:
            self.holds_strings = strings
        if self.holds_strings != strings:
            raise ValueError("a CodeTable holds strings or pairs of words, not both")
        out = np.empty(keys.shape[0], np.int64)
        lookup, insert = _LOOPS[strings]
        if self._lookup(lookup, keys, second, data, starts, out) == 0:
            return out, np.empty(0, np.int64)
        before, row = self.count, 0
        first = np.empty(0, np.int64)   # first[c − before]: the first row of new code c
        while True:
            limit = self.slots.shape[0] // 2
            first = np.concatenate([first, np.empty(limit - before - first.shape[0], np.int64)])
            row, self.count, self.used = insert(self.slots, self.arena, np.uint64(64 - self.bits), keys, second, data,
                                                starts, out, row, self.count, self.used, limit, before, first)
            if row < 0:
                return out, first[: self.count - before]
            if self.count >= limit:
                self._grow()
            else:   # the arena is full
                n = int(keys[row, 0] & np.uint64(0xFFFFFFFF))
                self.arena = np.concatenate([self.arena, np.empty(max(self.arena.size, n), np.uint8)])

    def _lookup(self, lookup, keys, second, data, starts, out) -> int:
        args = (self.slots, self.arena, np.uint64(64 - self.bits))
        rows = keys.shape[0]
        if rows < 1 << 16:
            return lookup(*args, keys, second, data, starts, out)
        from engine.reduce.fused import _helper   # the reduction's one helper thread
        half = rows // 2
        done = _helper().submit(lookup, *args, keys[:half], second[:half], data, starts, out[:half])
        misses = lookup(*args, keys[half:], second[half:], data, starts, out[half:])
        return misses + done.result()

    def _grow(self) -> None:
        self.bits += 1
        new = np.zeros((1 << self.bits, 3), np.uint64)
        _rehash_loop(self.slots, self.arena, np.uint64(64 - self.bits), self.holds_strings, new)
        self.slots = new
