"""engine.reduce.hashed: exact first-seen codes for string keys and pairs of words."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

hashed = pytest.importorskip("engine.reduce.hashed")
if hashed.numba is None:   # pragma: no cover
    pytest.skip("the tables need numba", allow_module_level=True)


def _reference(keys, seen):
    """Codes by a dict in first-seen order, and each new code's first row."""
    before = len(seen)
    codes = [seen.setdefault(k, len(seen)) for k in keys]
    first = {}
    for row, code in enumerate(codes):
        if code >= before:
            first.setdefault(code, row)
    return codes, [first[c] for c in sorted(first)]


def _awkward_strings(rng, count):
    """Short and long strings that share lengths, prefixes (4 and 12 bytes) and suffixes,
    the empty string, zero bytes and non-ASCII text."""
    base = ["", "a", "a\x00", "\x00", "abcd", "abcde", "abcdefghijkl", "abcdefghijklm", "abcdefghijkln",
            "bbcdefghijklm", "é", "ée", "x" * 40, "x" * 39 + "y", "y" + "x" * 39, "x" * 41]
    made = [f"{'k' * int(rng.integers(0, 3))}{int(v)}{'-' * int(rng.integers(0, 20))}"
            for v in rng.integers(0, 10**9, count)]
    return base + made


@pytest.mark.parametrize("bits", [1, 10])
def test_string_codes_match_a_dict_across_batches(bits):
    """Codes over batches that grow the table and the long strings' copy many times (from 2
    slots), repeat earlier keys, arrive in several chunks or as slices, and are large enough
    for the two-thread lookup."""
    rng = np.random.default_rng(12)
    pool = np.array(_awkward_strings(rng, 20_000), dtype=object)
    table, seen = hashed.CodeTable(bits), {}
    for rows in (70_000, 300_000, 7, 3, 150_000, 0):   # warm rows, lookups, misses; then in parts
        picked = pool[rng.integers(0, pool.size, rows)].tolist()
        column = pl.Series("k", picked, dtype=pl.String)
        if rows > 10:   # several chunks (to_arrow joins their views) and a slice (an offset)
            column = pl.concat([column[: rows // 3], column[rows // 3:]], rechunk=False)
            column = pl.concat([pl.Series("k", ["pad"], dtype=pl.String), column])[1:]
        if rows > 10:
            assert len(column.to_arrow(compat_level=pl.CompatLevel.newest()).buffers()) > 3   # data buffers: 2+
        codes, first = table.strings(column)
        want, want_first = _reference(picked, seen)
        assert codes.tolist() == want
        assert first.tolist() == want_first
    assert table.count == len(seen) == (table.slots[:, 2] > 0).sum()
    assert table.slots.shape[0] >= hashed.FAR_SLOTS   # the last batches took the blocked lookups


def test_short_strings_ignore_what_lies_past_them_in_the_view():
    """A view's bytes past a short string need not be zero: the key is its length and bytes."""
    def view(text: bytes, junk: int) -> list[int]:
        raw = len(text).to_bytes(4, "little") + text + bytes([junk]) * (12 - len(text))
        return [int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")]

    texts = [b"", b"ab", b"abcd", b"abcde", b"abcdefghijk", b"abcdefghijkl"]
    views = np.array([view(t, junk) for junk in (0, 0xAB, 0xFF) for t in texts], np.uint64)
    codes, first = hashed.CodeTable()._codes(views, np.empty(0, np.uint64), np.empty(0, np.uint8), np.zeros(1, np.int64),
                                             True)
    assert codes.tolist() == list(range(len(texts))) * 3
    assert first.tolist() == list(range(len(texts)))


def test_pair_codes_match_a_dict():
    rng = np.random.default_rng(13)
    table, seen = hashed.CodeTable(2), {}
    for rows in (100_000, 5, 20_000):
        a = rng.integers(-3, 3, rows) * 2**62 + rng.integers(0, 40, rows)
        b = rng.integers(0, 500, rows).astype(np.int64)
        codes, first = table.pairs(a, b)
        want, want_first = _reference(list(zip(a.tolist(), b.tolist())), seen)
        assert codes.tolist() == want and first.tolist() == want_first
    assert table.slots.shape[0] >= hashed.FAR_SLOTS   # the last batch took the blocked lookup


def test_a_table_holds_one_kind_of_key():
    table = hashed.CodeTable()
    table.strings(pl.Series(["a"]))
    with pytest.raises(ValueError, match="not both"):
        table.pairs(np.zeros(1, np.int64), np.zeros(1, np.int64))


@pytest.mark.parametrize("bits", [0, 33])
def test_a_table_starts_with_2_to_2_to_the_32_slots(bits):
    with pytest.raises(ValueError, match="expected 1 to 32"):
        hashed.CodeTable(bits)


def test_the_module_examples_run():
    import doctest

    assert doctest.testmod(hashed).failed == 0


@pytest.mark.parametrize("far_slots", [hashed.FAR_SLOTS, 1])   # row by row; in blocks
def test_long_strings_sharing_a_hash_tag_are_told_apart_by_their_bytes(far_slots):
    """Two 16-byte keys whose hashes share the low 32 bits (the tag beside the length) and the
    top 2 (the home slot in a 4-slot table), found by searching 2¹⁹ such strings: only the
    byte comparison keeps them apart."""
    a, b = "collide-00225374", "collide-00404338"
    ha, hb = (int(hashed._bytes_hash(np.frombuffer(x.encode(), np.uint8), 0, 16)) for x in (a, b))
    assert ha & 0xFFFFFFFF == hb & 0xFFFFFFFF and ha >> 62 == hb >> 62, "the pair no longer collides"
    table = hashed.CodeTable(2, far_slots=far_slots)
    codes, first = table.strings(pl.Series([a, b, a, b, a]))
    assert codes.tolist() == [0, 1, 0, 1, 0] and first.tolist() == [0, 1]
    codes, first = table.strings(pl.Series([b, "c" * 16, a, b]))   # lookups: b probes past a's tag
    assert codes.tolist() == [1, 2, 0, 1] and first.tolist() == [1]


@pytest.mark.parametrize("far_slots", [hashed.FAR_SLOTS, 1])   # row by row; in blocks
def test_long_strings_are_read_only_within_their_buffer(far_slots):
    """The loops read a long string where Arrow keeps it, across buffers spanned by one array
    (``hashed._spanning``), so they must never read past a string: here each buffer ends at a
    page that cannot be read, and each string (13 to 64 bytes: every tail, whole words too)
    ends its buffer. A read past it would crash the process."""
    import ctypes
    import mmap

    pa = pytest.importorskip("pyarrow")
    page = mmap.PAGESIZE
    memory = mmap.mmap(-1, 4 * page)
    base = np.frombuffer(memory, np.uint8).ctypes.data
    libc = ctypes.CDLL(None, use_errno=True)
    for guard in (1, 3):
        assert libc.mprotect(ctypes.c_void_p(base + guard * page), page, 0) == 0, ctypes.get_errno()
    try:
        buffers = [pa.foreign_buffer(base + 2 * index * page, page) for index in range(2)]
        data, starts = hashed._spanning(buffers)
        assert data.size == 3 * page and starts.tolist() == [0, 2 * page]
        for length in range(13, 65):   # each length in turn: its two strings end the two buffers
            texts = [bytes([97 + length % 26]) * length, bytes([65 + length % 26]) * (length - 1) + b"!"]
            views = []
            for index, text in enumerate(texts):   # buffer `index` is page 2·index
                offset = page - len(text)
                ctypes.memmove(base + 2 * index * page + offset, text, len(text))
                views.append([len(text) | int.from_bytes(text[:4], "little") << 32, index | offset << 32])
            keys = np.array(views * 3, np.uint64)
            table = hashed.CodeTable(far_slots=far_slots)
            codes, first = table._codes(keys, np.empty(0, np.uint64), data, starts, True)
            assert codes.tolist() == [0, 1] * 3 and first.tolist() == [0, 1]
            codes, first = table._codes(keys[::-1].copy(), np.empty(0, np.uint64), data, starts, True)
            assert codes.tolist() == [1, 0] * 3 and first.tolist() == []   # lookups
    finally:
        for guard in (1, 3):
            libc.mprotect(ctypes.c_void_p(base + guard * page), page, mmap.PROT_READ | mmap.PROT_WRITE)
        memory.close()


def test_the_span_leaves_out_empty_buffers():
    """An empty buffer's address may be anything (a static placeholder): it must not stretch
    the span, and no view can point into it."""
    pa = pytest.importorskip("pyarrow")
    text = pa.py_buffer(b"a string longer than twelve bytes")
    data, starts = hashed._spanning([pa.py_buffer(b""), text, pa.py_buffer(b"")])
    assert data.size == text.size and starts.tolist() == [0, 0, 0]
    assert bytes(data) == text.to_pybytes()
    data, starts = hashed._spanning([])
    assert data.size == 0 and starts.tolist() == [0]
