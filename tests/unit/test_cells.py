"""Cells: exact statistics, exact merges, a stable content hash."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from engine import validate
from engine.cells import Cells, merge
from engine.encode import encode
from engine.reduce import reduce
from engine.spec import Spec


def numpy_cells(frame: pl.DataFrame, groups, covariates):
    """Float64 two-pass reference, one (group, arm) at a time."""
    out = {}
    keys = frame.select([*groups, "treated"]).unique().rows()
    for key in keys:
        mask = np.ones(frame.height, bool)
        for col, value in zip([*groups, "treated"], key):
            mask &= (frame[col] == value).to_numpy()
        y = frame["y"].to_numpy()[mask]
        stats = {"n": mask.sum(), "mean": y.mean(), "m2": ((y - y.mean()) ** 2).sum()}
        for c in covariates:
            x = frame[c].to_numpy()[mask]
            stats[f"x_mean__{c}"] = x.mean()
            stats[f"xy_m2__{c}"] = ((x - x.mean()) * (y - y.mean())).sum()
            stats[f"xx_m2__{c}__{c}"] = ((x - x.mean()) ** 2).sum()
        out[key] = stats
    return out


def make_frame(seed, offset):
    rng = np.random.default_rng(seed)
    n = 5000
    group = rng.integers(0, 40, n)
    x = offset + rng.standard_normal(n)
    return pl.DataFrame({
        "group": [f"g{g}" for g in group],
        "treated": rng.integers(0, 2, n),
        "pre": x,
        "y": offset + 0.7 * (x - offset) + rng.standard_normal(n),
    })


def reduce_frame(frame, covariates=("pre",)):
    spec = Spec(outcome="y", treatment="treated", groups=("group",), covariates=tuple(covariates))
    return reduce(validate.check(validate.resolve_source(frame), spec), spec)


@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_reduce_matches_float64_reference(offset):
    frame = make_frame(1, offset)
    cells = reduce_frame(frame)
    reference = numpy_cells(frame, ["group"], ["pre"])
    assert cells.table.height == len(reference)
    for row in cells.table.iter_rows(named=True):
        ref = reference[(row["group"], row["arm"])]
        assert row["n"] == ref["n"]
        # Relative to the data's spread (sd 1), not the offset.
        for name in ("mean", "m2", "x_mean__pre", "xy_m2__pre", "xx_m2__pre__pre"):
            scale = 1.0 if name.endswith("mean") or name.startswith("x_mean") else ref["n"]
            assert abs(row[name] - ref[name]) <= 1e-6 * scale + 1e-12 * abs(ref[name]), name


@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_merge_of_parts_equals_whole(offset):
    frame = make_frame(2, offset)
    whole = reduce_frame(frame).table
    parts = [reduce_frame(frame[i::3]).table for i in range(3)]
    merged = merge(parts, ["group"], ["pre"])
    assert merged.select(["group", "arm", "n"]).equals(whole.select(["group", "arm", "n"]))
    reference = numpy_cells(frame, ["group"], ["pre"])
    for name in ("mean", "m2", "x_mean__pre", "xy_m2__pre", "xx_m2__pre__pre"):
        expected = np.array([reference[(g, a)][name] for g, a in merged.select("group", "arm").rows()])
        # Float64 at offset 1e9 resolves means to ~1e-7; sums of squares are O(n) with sd 1.
        atol = (1e-6 if offset else 1e-12) * (1 if "mean" in name else merged["n"].to_numpy())
        np.testing.assert_array_less(np.abs(merged[name].to_numpy() - expected), atol + 1e-12 * np.abs(expected),
                                     err_msg=name)


def test_content_hash_is_stable_and_row_sensitive():
    frame = make_frame(3, 0.0)
    a = reduce_frame(frame)
    # Same rows, same bits: the reduction does not depend on thread timing.
    assert {reduce_frame(frame.clone()).content_hash() for _ in range(5)} == {a.content_hash()}
    changed = frame.with_row_index().with_columns(
        y=pl.when(pl.col("index") == 17).then(pl.col("y") + 1e-6).otherwise(pl.col("y"))).drop("index")
    assert reduce_frame(changed).content_hash() != a.content_hash()


def test_pooled_moments_are_exact():
    frame = make_frame(4, 1e9)
    moments = reduce_frame(frame).pooled_moments()
    y = frame["y"].to_numpy()
    assert moments["y"][0] == pytest.approx(y.mean(), rel=1e-15)
    assert moments["y"][1] == pytest.approx(y.std(), rel=1e-6)
    assert moments["pre"][1] == pytest.approx(frame["pre"].to_numpy().std(), rel=1e-6)


def test_encode_tree_and_one_arm_groups():
    table = pl.DataFrame({"c": ["A", "A", "B", "B", "B"], "r": ["a1", "a1", "b1", "b2", "b2"],
                          "arm": [0, 1, 0, 0, 1], "n": [3, 4, 5, 6, 7], "mean": [1.0] * 5, "m2": [0.0] * 5})
    encoding = encode(Cells(table, ("c", "r")))
    assert encoding.num_nodes == (2, 3)
    assert encoding.parents[0].tolist() == [0, 1, 1]
    assert encoding.cell_leaf.tolist() == [0, 0, 1, 2, 2]
    assert encoding.leaf_rows.tolist() == [7, 5, 13]
    # b1 has only control rows: valid data, n_treated 0.
    assert encoding.nodes[1]["n_treated"].to_list() == [4, 0, 7]


@pytest.mark.parametrize("batch_rows", [1, 333, 4096])
def test_batched_reduction_matches_one_batch(batch_rows):
    from engine.reduce.polars import reduce_polars

    frame = make_frame(5, 1e9).with_columns(arm=pl.col("treated").cast(pl.Int8))
    whole = reduce_polars(frame.lazy(), ["group"], "y", ["pre"], batch_rows=1 << 30).table
    batched = reduce_polars(frame.lazy(), ["group"], "y", ["pre"], batch_rows=batch_rows).table
    assert batched.select("group", "arm", "n").equals(whole.select("group", "arm", "n"))
    reference = numpy_cells(frame, ["group"], ["pre"])
    for name in ("mean", "m2", "x_mean__pre", "xy_m2__pre", "xx_m2__pre__pre"):
        expected = np.array([reference[(g, a)][name] for g, a in batched.select("group", "arm").rows()])
        atol = 1e-6 * (1 if "mean" in name else batched["n"].to_numpy())
        np.testing.assert_array_less(np.abs(batched[name].to_numpy() - expected), atol + 1e-12 * np.abs(expected),
                                     err_msg=name)


def test_cells_with_sd_instead_of_m2(tmp_path):
    from engine import cells as cells_mod

    frame = make_frame(6, 0.0)
    reduced = reduce_frame(frame, covariates=()).table
    as_sd = reduced.with_columns((pl.col("m2") / (pl.col("n") - 1)).sqrt().alias("sd")).drop("m2")
    as_sd = as_sd.with_columns(pl.when(pl.col("n") > 1).then(pl.col("sd")).otherwise(None).alias("sd"))
    as_sd.write_parquet(tmp_path / "site.parquet")
    read = cells_mod.read([tmp_path / "site.parquet"], levels=["group"])
    np.testing.assert_allclose(read.table["m2"].to_numpy(), reduced["m2"].to_numpy(), rtol=1e-12, atol=1e-12)
    as_sd.with_columns(n=pl.lit(0, pl.Int64)).write_parquet(tmp_path / "bad.parquet")
    from engine.errors import DataError
    with pytest.raises(DataError, match="n < 1"):
        cells_mod.read([tmp_path / "bad.parquet"], levels=["group"])


def test_merge_keeps_cells_whose_key_is_null():
    """A null top-level key is one group in both tables (as the join matches it): merged, not lost."""
    a = pl.DataFrame({"g": [1, None, 3], "arm": [0, 0, 0], "n": [2, 2, 2], "mean": [1.0, 2.0, 3.0],
                      "m2": [0.5, 0.5, 0.5]})
    b = pl.DataFrame({"g": [2, None], "arm": [0, 0], "n": [2, 2], "mean": [4.0, 4.0], "m2": [0.5, 0.5]})
    merged = merge([a, b], ["g"], [])
    assert merged.height == 4
    null_cell = merged.filter(pl.col("g").is_null()).row(0, named=True)
    assert null_cell["n"] == 4 and null_cell["mean"] == 3.0 and null_cell["m2"] == pytest.approx(1.0 + 4.0)


@pytest.mark.parametrize("change, message", [
    ({"n": [2.5, 3.0]}, "not a whole number"),
    ({"g": [None, "b"]}, "null group keys"),
])
def test_cell_tables_with_fractional_counts_or_null_keys_are_refused(tmp_path, change, message):
    from engine.cells import read
    from engine.errors import DataError

    table = pl.DataFrame({"g": ["a", "b"], "arm": [0, 1], "n": [2.0, 3.0], "mean": [1.0, 2.0], "m2": [0.5, 0.5]})
    path = tmp_path / "cells.parquet"
    table.with_columns(**{k: pl.Series(v) for k, v in change.items()}).write_parquet(path)
    with pytest.raises(DataError, match=message):
        read([path], levels=["g"])


def _integer_cells(seed, low, high, rows, k, dtype):
    from engine.reduce.polars import reduce_polars

    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, high - low, rows).astype(np.uint64)
    key = pl.Series(offsets + np.uint64(low % 2**64)).cast(dtype) if dtype == pl.UInt64 else \
        pl.Series(rng.integers(low, high, rows)).cast(dtype)
    data = {"g": key, "arm": rng.integers(0, 2, rows).astype(np.int8), "y": 1e6 + rng.normal(size=rows)}
    data.update({f"x{j}": rng.normal(size=rows) for j in range(k)})
    return reduce_polars(pl.DataFrame(data).lazy(), ["g"], "y", [f"x{j}" for j in range(k)]).table


@pytest.mark.parametrize("dtype, low", [(pl.Int64, -50), (pl.UInt64, 2**64 - 1000), (pl.Int16, 100), (pl.UInt8, 0)])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_sorted_integer_merge_gives_the_joins_bits(dtype, low, k, monkeypatch):
    """Two tables of one integer key, sorted by (key, arm), overlapping in part: the compiled
    sorted merge (engine.cells._merge_sorted) gives the join's table bit for bit."""
    from engine import cells as cells_mod
    from engine.reduce import fused

    if fused.numba is None:
        pytest.skip("numba is not installed")
    a, b = _integer_cells(1, low, low + 100, 300, k, dtype), _integer_cells(2, low + 30, low + 120, 200, k, dtype)
    covariates = [f"x{j}" for j in range(k)]
    calls = []
    original = cells_mod._merge_sorted
    monkeypatch.setattr(cells_mod, "_merge_sorted", lambda *a: calls.append(1) or original(*a))
    fast = cells_mod.merge_pair(a, b, ["g"], covariates)
    monkeypatch.setattr(cells_mod, "_merge_sorted", lambda *a: None)
    joined = cells_mod.merge_pair(a, b, ["g"], covariates).sort(["g", "arm"])
    assert calls and fast.schema == joined.schema and fast.equals(joined)


@pytest.mark.parametrize("change", ["unsorted", "repeated", "arm 2", "null arm"])
def test_sorted_merge_declines_what_it_cannot_take(change):
    """Tables the compiled merge must not take go to the join (and merge as before)."""
    from engine import cells as cells_mod
    from engine.reduce import fused

    if fused.numba is None:
        pytest.skip("numba is not installed")
    a, b = _integer_cells(3, 0, 60, 200, 1, pl.Int64), _integer_cells(4, 20, 80, 200, 1, pl.Int64)
    if change == "unsorted":
        a = a.reverse()
    elif change == "repeated":
        a = pl.concat([a.head(1), a])
    elif change == "arm 2":
        a = a.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(2).otherwise(pl.col("arm")).cast(pl.Int8)
                           .alias("arm"))
    else:
        a = a.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("arm")).alias("arm"))
    assert cells_mod._merge_sorted(a, b, ["g"], ["x0"], 0) is None


def test_content_hash_bytes_are_the_documented_ones():
    """The digest is SHA-256 over, per column in canonical order, ``name:dtype\\n`` and then
    the raw values (numeric) or the strings joined by \\x1f: recomputed here by hand, so a
    faster implementation cannot change the hashes recorded in earlier provenance files."""
    import hashlib

    table = pl.DataFrame({"region": ["b", "a", "a", "é"], "arm": pl.Series([0, 1, 0, 1], dtype=pl.Int8),
                          "n": [3, 1, 2, 5], "mean": [0.5, -1.0, 2.25, 1e9], "m2": [1.0, 0.0, 0.5, 3.0]})
    cells = Cells(table=table, levels=("region",))
    ordered = table.sort(["region", "arm"])
    digest = hashlib.sha256()
    for name in ordered.columns:
        column = ordered[name]
        digest.update(f"{name}:{column.dtype}\n".encode())
        if column.dtype.is_numeric():
            digest.update(np.ascontiguousarray(column.to_numpy()).tobytes())
        else:
            digest.update("\x1f".join(column.to_list()).encode())
    assert cells.content_hash() == digest.hexdigest()


def test_sorted_one_level_encoding_equals_the_general_one():
    """Cells sorted by their one key (what reduce returns) take a run-length encoding; the
    same nodes, weights and leaf codes as the joins of the general path on shuffled cells."""
    frame = pl.DataFrame({"group": [f"k{i % 37:03d}" for i in range(500)], "treated": [i % 3 == 0 for i in range(500)],
                          "y": np.random.default_rng(2).standard_normal(500)})
    cells = reduce_frame(frame, covariates=())
    assert cells.table["group"].is_sorted() and cells.table.height > 37
    fast = encode(cells)
    shuffled = Cells(table=cells.table.sample(fraction=1.0, shuffle=True, seed=4), levels=cells.levels)
    general = encode(shuffled)
    assert fast.nodes[0].equals(general.nodes[0])
    np.testing.assert_array_equal(fast.leaf_rows, general.leaf_rows)
    leaf_of = dict(zip(shuffled.table["group"].to_list(), general.cell_leaf.tolist()))
    assert fast.cell_leaf.tolist() == [leaf_of[k] for k in cells.table["group"].to_list()]
    # A shared cell table may hold float counts: the nodes keep that dtype on both paths.
    floats = cells.table.with_columns(pl.col("n").cast(pl.Float64))
    fast = encode(Cells(table=floats, levels=cells.levels))
    general = encode(Cells(table=floats.sample(fraction=1.0, shuffle=True, seed=4), levels=cells.levels))
    assert fast.nodes[0].equals(general.nodes[0]) and fast.nodes[0].schema == general.nodes[0].schema
