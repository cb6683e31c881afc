"""The polars, jax and dask reduce backends give the same cells, from every kind of input.

The dask tests run a real ``LocalCluster`` of two worker processes on
loopback; one of them kills a worker mid-run and still gets the same bits.
"""
from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from engine import validate
from engine.cells import Cells, covariate_columns
from engine.cli import main
from engine.errors import DataError, EngineError, SchemaError, SpecError
from engine.reduce import reduce
from engine.reduce import jax as jax_backend
from engine.reduce.dask import check_file_schemas, reduce_dask, row_transform
from engine.spec import Spec

BACKENDS = ("polars", "jax", "dask")
EPS = np.finfo(np.float64).eps


# --- shared helpers (also used by tests/property) ------------------------------------------


def make_rows(seed=0, rows=3000, regions=60, offset=1e9, covariates=True) -> pl.DataFrame:
    """Two levels (country ▸ region), a long tail of one-row regions, values at ``offset``."""
    rng = np.random.default_rng(seed)
    busy = regions // 2
    region = np.concatenate([rng.integers(0, busy, rows - (regions - busy)), np.arange(busy, regions)])
    treated = rng.integers(0, 2, rows)
    pre = offset + rng.standard_normal(rows)
    age = 40.0 + 10.0 * rng.standard_normal(rows)
    y = offset + 0.5 * (pre - offset) + 0.05 * (age - 40) + 0.3 * treated + 0.2 * (region % 5) \
        + rng.standard_normal(rows)
    frame = pl.DataFrame({"country": region // 7, "region": [f"r{r:03d}" for r in region],
                          "treated": treated, "y": y})
    return frame.with_columns(pre=pl.Series(pre), age=pl.Series(age)) if covariates else frame


def reference_cells(frame: pl.DataFrame, levels, covariates, outcome="y", arm="treated") -> pl.DataFrame:
    """Float64 two-pass statistics per (levels, arm), one cell at a time (NumPy)."""
    keys = frame.select([*levels, arm]).unique().sort([*levels, arm])
    rows = []
    for key in keys.iter_rows():
        mask = np.ones(frame.height, bool)
        for col, value in zip([*levels, arm], key):
            mask &= (frame[col] == value).to_numpy()
        y = frame[outcome].to_numpy()[mask]
        xs = {c: frame[c].cast(pl.Float64).to_numpy()[mask] for c in covariates}
        centred = {c: v - (v[0] + (v - v[0]).mean()) for c, v in {outcome: y, **xs}.items()}
        row = {"n": int(mask.sum()), "mean": y[0] + (y - y[0]).mean(), "m2": (centred[outcome] ** 2).sum()}
        for c in covariates:
            row[f"x_mean__{c}"] = xs[c][0] + (xs[c] - xs[c][0]).mean()
        for c in covariates:
            row[f"xy_m2__{c}"] = (centred[c] * centred[outcome]).sum()
        for i, a in enumerate(covariates):
            for b in covariates[i:]:
                row[f"xx_m2__{a}__{b}"] = (centred[a] * centred[b]).sum()
        rows.append(row)
    return pl.concat([keys.rename({arm: "arm"}).with_columns(pl.col("arm").cast(pl.Int8)),
                      pl.DataFrame(rows)], how="horizontal")


def assert_cells_agree(got: Cells | pl.DataFrame, want: Cells | pl.DataFrame, levels, covariates, *, rel=1e-9):
    """Same keys, arms and counts exactly; every float to ``rel`` relative, with floors.

    Floors: a cell's sums of squares are compared on the scale n·sd² (sd of the
    whole column), means on sd, so near-zero values are not held to a relative
    test. At a large offset μ, a mean is only resolved to ~ε·μ, and methods that
    merge absolute means (Polars' variance, ``engine.cells.merge``) carry an
    error of ~n·ε·μ·sd in sums of squares; 16·ε·μ terms allow for that.
    """
    got = got.table if isinstance(got, Cells) else got
    want = want.table if isinstance(want, Cells) else want
    keys = [*levels, "arm", "n"]
    assert got.select(keys).equals(want.select(keys)), "keys, arms or counts differ"
    n = want["n"].cast(pl.Float64).to_numpy()
    moments = Cells(want, tuple(levels), tuple(covariates)).pooled_moments()
    centre = {name: abs(mean) for name, (mean, _) in moments.items()}
    spread = {name: sd for name, (_, sd) in moments.items()}

    def check(column, tolerance):
        error = np.abs(got[column].to_numpy() - want[column].to_numpy())
        bound = rel * np.abs(want[column].to_numpy()) + tolerance
        worst = int(np.argmax(error - bound))
        assert np.all(error <= bound), (f"{column}: |Δ| {error[worst]:.3g} > {bound[worst]:.3g} "
                                        f"(value {want[column][worst]!r}, n {n[worst]:.0f})")

    def second_moment(a, b):
        return n * (rel * spread[a] * spread[b] + 16 * EPS * (centre[a] * spread[b] + centre[b] * spread[a]))

    check("mean", rel * spread["y"] + 16 * EPS * centre["y"])
    check("m2", second_moment("y", "y"))
    for c in covariates:
        check(f"x_mean__{c}", rel * spread[c] + 16 * EPS * centre[c])
        check(f"xy_m2__{c}", second_moment(c, "y"))
    for i, a in enumerate(covariates):
        for b in covariates[i:]:
            check(f"xx_m2__{a}__{b}", second_moment(a, b))


def assert_same_layout(cells: Cells, other: Cells):
    assert cells.table.schema == other.table.schema, (cells.table.schema, other.table.schema)
    assert cells.levels == other.levels and cells.covariates == other.covariates


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0") as local:
        yield local


@pytest.fixture(scope="module")
def client(cluster):
    from distributed import Client

    with Client(cluster, set_as_default=False) as c:
        yield c


def spec_for(backend, cluster=None, levels=("country", "region"), covariates=("pre", "age"), **options):
    return Spec(outcome="y", treatment="treated", groups=tuple(levels), covariates=tuple(covariates),
                backend=backend, scheduler=cluster.scheduler_address if cluster is not None else None, **options)


def write_sources(frame: pl.DataFrame, folder) -> dict:
    """The same rows as several inputs: a frame, Parquet files with row groups, CSV, a Dask DataFrame."""
    import dask.dataframe as dd

    folder.mkdir(exist_ok=True)
    thirds = [frame[i::3] for i in range(3)]
    for i, part in enumerate(thirds):
        part.write_parquet(folder / f"part{i}.parquet", row_group_size=256)
        part.write_csv(folder / f"part{i}.csv")
    ordered = pl.concat(thirds)
    return {"frame": (ordered, ordered),
            "parquet": (str(folder / "part*.parquet"), ordered),
            "csv": (str(folder / "part*.csv"), ordered),
            "dask": (dd.from_pandas(ordered.to_pandas(), npartitions=4), ordered)}


# --- agreement -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["frame", "parquet", "csv", "dask"])
def test_backends_agree_on_every_input(kind, cluster, tmp_path):
    data, rows = write_sources(make_rows(seed=1), tmp_path)[kind]
    reference = reference_cells(rows, ["country", "region"], ["pre", "age"])
    results = {}
    for backend in BACKENDS:
        spec = spec_for(backend, cluster)
        results[backend] = reduce(validate.check(validate.resolve_source(data), spec), spec)
    for backend, cells in results.items():
        assert_same_layout(cells, results["polars"])
        assert cells.table.columns == ["country", "region", "arm", "n", "mean", "m2",
                                       *covariate_columns(["pre", "age"])]
        assert_cells_agree(cells, reference, ["country", "region"], ["pre", "age"])
        assert_cells_agree(cells, results["polars"], ["country", "region"], ["pre", "age"])
    assert (results["polars"].table["n"] == 1).sum() >= 20, "the data should have one-row cells"


def test_dask_splits_row_groups_and_merges_in_a_fixed_tree(client, tmp_path):
    data, rows = write_sources(make_rows(seed=2, offset=0.0), tmp_path)["parquet"]
    spec = spec_for("dask")
    checked = validate.check(validate.resolve_source(data), spec)
    split = reduce_dask(checked, spec, client=client, partition_rows=300, batch_rows=100)
    whole = reduce_dask(checked, spec, client=client)
    assert_cells_agree(split, whole, ["country", "region"], ["pre", "age"])
    assert_cells_agree(split, reference_cells(rows, ["country", "region"], ["pre", "age"]),
                       ["country", "region"], ["pre", "age"])
    again = reduce_dask(checked, spec, client=client, partition_rows=300, batch_rows=100)
    assert again.content_hash() == split.content_hash(), "same input, same bits"


def test_dask_survives_a_killed_worker_with_the_same_bits(client, tmp_path):
    """A partition task kills its own worker process on its first attempt; the scheduler
    re-runs it on a live worker and the fixed merge tree gives the same bits."""
    import dask.dataframe as dd

    marker = str(tmp_path / "killed-once")
    open(marker, "w").close()  # validation computes partitions on this process: no kill there

    def kill_first_attempt(part, marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-task
        return part

    rows = make_rows(seed=3, offset=1e9)
    ddf = dd.from_pandas(rows.to_pandas(), npartitions=6)
    ddf = ddf.map_partitions(kill_first_attempt, marker, meta=ddf._meta)
    spec = spec_for("dask")
    checked = validate.check(validate.resolve_source(ddf), spec)
    calm = reduce_dask(checked, spec, client=client)
    os.remove(marker)
    survived = reduce_dask(checked, spec, client=client)
    assert os.path.exists(marker), "the kill branch should have run"
    assert survived.content_hash() == calm.content_hash()
    assert_cells_agree(calm, reference_cells(rows, ["country", "region"], ["pre", "age"]),
                       ["country", "region"], ["pre", "age"])


def test_hive_folder_on_every_backend(cluster, tmp_path):
    rows = make_rows(seed=4, offset=0.0)
    for country, part in rows.partition_by("country", as_dict=True).items():
        folder = tmp_path / "hive" / f"country={country[0]}"
        folder.mkdir(parents=True)
        part.drop("country").write_parquet(folder / "data.parquet")
    results = {}
    for backend in BACKENDS:
        spec = spec_for(backend, cluster)
        results[backend] = reduce(validate.check(validate.resolve_source(tmp_path / "hive"), spec), spec)
    for cells in results.values():
        assert_same_layout(cells, results["polars"])
        assert_cells_agree(cells, results["polars"], ["country", "region"], ["pre", "age"])
    assert results["polars"].n_rows == rows.height


@pytest.mark.parametrize("case", ["drop_missing", "treated_value", "boolean", "no_groups"])
def test_row_transform_is_the_validated_one(case, client):
    rows = make_rows(seed=5, rows=800, offset=0.0)
    options, levels, covariates = {}, ("country", "region"), ("pre", "age")
    if case == "drop_missing":
        rows = rows.with_row_index().with_columns(
            y=pl.when(pl.col("index") % 50 == 0).then(float("nan")).otherwise(pl.col("y")),
            region=pl.when(pl.col("index") % 77 == 1).then(None).otherwise(pl.col("region")),
            age=pl.when(pl.col("index") % 91 == 2).then(None).otherwise(pl.col("age"))).drop("index")
        options["drop_missing"] = True
    elif case == "treated_value":
        rows = rows.with_columns(treated=pl.when(pl.col("treated") == 1).then(pl.lit("B")).otherwise(pl.lit("A")))
        options["treated_value"] = "B"
    elif case == "boolean":
        rows = rows.with_columns(pl.col("treated").cast(pl.Boolean))
    else:
        levels, covariates = (), ("pre",)
    results = {}
    for backend in BACKENDS:
        spec = spec_for(backend, levels=levels, covariates=covariates, **options)
        checked = validate.check(validate.resolve_source(rows), spec)
        if backend == "dask":
            transform = row_transform(checked, spec)
            assert transform.apply(checked.source.frame).collect().equals(checked.rows.collect())
            results[backend] = reduce_dask(checked, spec, client=client, partition_rows=128)
        else:
            results[backend] = reduce(checked, spec)
    if case == "drop_missing":
        assert results["polars"].n_rows == checked.n_rows_used < rows.height
    for cells in results.values():
        assert_same_layout(cells, results["polars"])
        assert_cells_agree(cells, results["polars"], list(levels), list(covariates))


def test_polars_backend_merges_three_batches_with_two_covariates():
    """Regression: merged tables once came back with covariate columns interleaved, so a
    merged and a fresh batch table could not be concatenated (3 batches, 2 covariates)."""
    rows = make_rows(seed=12, rows=1000).with_columns(arm=pl.col("treated").cast(pl.Int8))
    from engine.reduce.polars import reduce_polars

    batched = reduce_polars(rows.lazy(), ["region"], "y", ["pre", "age"], batch_rows=400)
    whole = reduce_polars(rows.lazy(), ["region"], "y", ["pre", "age"], batch_rows=1 << 20)
    assert batched.table.columns == whole.table.columns
    assert_cells_agree(batched, whole, ["region"], ["pre", "age"])


# --- jax: compile once per bucket, float32 -------------------------------------------------


def test_jax_backend_reuses_its_compiled_step():
    spec = spec_for("jax")
    first = make_rows(seed=6, rows=1100, regions=40)
    checked = validate.check(validate.resolve_source(first), spec)
    reduce(checked, spec)
    traces = jax_backend.TRACES["accumulate"]
    # More rows (same block bucket), more groups (same segment bucket): no new trace.
    for rows, regions in ((1900, 40), (1500, 50)):
        frame = make_rows(seed=rows, rows=rows, regions=regions)
        checked = validate.check(validate.resolve_source(frame), spec)
        cells = reduce(checked, spec)
        assert_cells_agree(cells, reference_cells(frame, ["country", "region"], ["pre", "age"]),
                           ["country", "region"], ["pre", "age"])
    assert jax_backend.TRACES["accumulate"] == traces


def test_jax_many_integer_and_string_keys():
    rng = np.random.default_rng(7)
    rows = 100_000
    key = rng.integers(-(2**40), 2**40, 30_000)[rng.integers(0, 30_000, rows)]
    frame = pl.DataFrame({"user": key, "name": pl.Series(key).cast(pl.String), "treated": rng.integers(0, 2, rows),
                          "y": rng.standard_normal(rows)})
    for level in ("user", "name"):
        spec = Spec(outcome="y", treatment="treated", groups=(level,), backend="jax")
        checked = validate.check(validate.resolve_source(frame), spec)
        cells = reduce(checked, spec)
        polars_cells = reduce(checked, Spec(outcome="y", treatment="treated", groups=(level,)))
        assert_same_layout(cells, polars_cells)
        assert_cells_agree(cells, polars_cells, [level], [])


def test_jax_float32_against_float64_at_offset_1e9():
    rows = make_rows(seed=8, rows=20_000, regions=40, offset=1e9)
    spec = spec_for("jax")
    checked = validate.check(validate.resolve_source(rows), spec)
    exact = jax_backend.reduce_jax(checked.rows, spec.groups, "y", spec.covariates)
    single = jax_backend.reduce_jax(checked.rows, spec.groups, "y", spec.covariates, precision="float32")
    assert_same_layout(single, exact)
    # kernels/segments.py: means to 2e-5·sd, sums of squares to 2e-4·n·sd² (sd ≈ 1 and 10 here).
    assert_cells_agree(single, exact, ["country", "region"], ["pre", "age"], rel=2e-4)


# --- bad input: typed errors before any compute, nothing written ---------------------------


def cli_reduce(data, out, backend, *extra):
    return main(["reduce", *map(str, data), "--outcome", "y", "--treatment", "treated", "--group", "region",
                 "--backend", backend, "--out", str(out), *extra])


@pytest.fixture
def mismatched(tmp_path):
    rows = make_rows(seed=9, rows=300, covariates=False, offset=0.0)
    rows[:150].write_parquet(tmp_path / "a.parquet")
    rows[150:].with_columns(pl.col("y").cast(pl.String)).write_parquet(tmp_path / "b.parquet")
    rows[:150].write_csv(tmp_path / "a.csv")
    rows[150:].with_columns(y=pl.col("treated")).write_csv(tmp_path / "b.csv")  # y: float, then int
    rows[150:].rename({"y": "outcome"}).write_parquet(tmp_path / "c.parquet")
    (tmp_path / "empty_hive" / "region=r001").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inputs", [["a.parquet", "b.parquet"],
                                    ["a.csv", "b.csv"],
                                    ["a.parquet", "c.parquet"], ["empty_hive"]])
def test_bad_inputs_are_refused_before_compute(mismatched, cluster, capsys, backend, inputs):
    out = mismatched / "out" / "cells.parquet"
    code = cli_reduce([mismatched / name for name in inputs], out, backend, "--scheduler",
                      cluster.scheduler_address)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error:" in err and err.count("\n") == 1
    assert not out.parent.exists(), "nothing written"


@pytest.mark.parametrize("files, message", [
    (["a.parquet", "b.parquet"], "column 'y' has type Float64 in '{0}' but String in '{1}'"),
    (["a.csv", "b.csv"], "column 'y' has type Float64 in '{0}' but Int64 in '{1}'"),
    (["a.parquet", "c.parquet"], "column 'y' is in '{0}' but not in '{1}'"),
])
def test_file_schema_check_names_both_files(mismatched, files, message):
    paths = [str(mismatched / f) for f in files]
    with pytest.raises(SchemaError) as error:
        check_file_schemas(paths, ["y", "treated", "region"])
    assert message.format(*paths) in str(error.value)
    check_file_schemas([paths[0], paths[0]], ["y"])  # the same schema twice is fine


def test_validation_names_both_files_of_a_schema_mismatch(mismatched):
    spec = Spec(outcome="y", treatment="treated", groups=("region",))
    with pytest.raises(SchemaError, match="a.parquet.*b.parquet"):
        validate.check(validate.resolve_source([mismatched / "a.parquet", mismatched / "b.parquet"]), spec)


def test_unreachable_scheduler_is_a_spec_error(monkeypatch):
    from engine.reduce import dask as dask_backend

    monkeypatch.setattr(dask_backend, "CONNECT_TIMEOUT_S", 1)
    spec = Spec(outcome="y", treatment="treated", groups=("region",), backend="dask",
                scheduler="tcp://127.0.0.1:9")
    checked = validate.check(validate.resolve_source(make_rows(rows=100, covariates=False)), spec)
    with pytest.raises(SpecError, match="cannot connect"):
        reduce(checked, spec)


def test_the_api_passes_a_scheduler_to_the_dask_backend(monkeypatch):
    """``engine.fit(..., backend="dask", scheduler=ADDRESS)`` as the CLI's ``--scheduler``."""
    import engine
    from engine.reduce import dask as dask_backend

    monkeypatch.setattr(dask_backend, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(SpecError, match="cannot connect.*127.0.0.1:9"):
        engine.fit(make_rows(rows=100, covariates=False), outcome="y", treatment="treated", groups=["region"],
                   backend="dask", scheduler="tcp://127.0.0.1:9")


def test_cli_reduce_writes_the_same_cells_from_every_backend(cluster, tmp_path):
    path = tmp_path / "rows.parquet"
    make_rows(seed=10, rows=1000).write_parquet(path)
    tables = {}
    for backend in BACKENDS:
        out = tmp_path / f"{backend}.parquet"
        assert cli_reduce([path], out, backend, "--covariate", "pre", "--scheduler", cluster.scheduler_address) == 0
        tables[backend] = pl.read_parquet(out)
    for table in tables.values():
        assert table.schema == tables["polars"].schema
        assert_cells_agree(table, tables["polars"], ["region"], ["pre"])


@pytest.mark.slow
def test_dask_without_a_scheduler_starts_a_local_cluster():
    rows = make_rows(seed=11, rows=500, covariates=False, offset=0.0)
    results = {}
    for backend in ("polars", "dask"):
        spec = Spec(outcome="y", treatment="treated", groups=("region",), backend=backend)
        results[backend] = reduce(validate.check(validate.resolve_source(rows), spec), spec)
    assert_cells_agree(results["dask"], results["polars"], ["region"], [])


def test_backend_names():
    for backend in BACKENDS:
        assert Spec(outcome="y", treatment="t", backend=backend).backend == backend
    with pytest.raises(SpecError, match="unknown"):
        Spec(outcome="y", treatment="t", backend="spark")
    assert isinstance(SpecError("x"), EngineError) and issubclass(DataError, EngineError)


# --- GLMs with covariates: cells keyed by covariate bin ---------------------------------------


@pytest.mark.parametrize("kind", ["frame", "parquet"])
def test_binned_cells_agree_on_every_backend(kind, cluster, tmp_path):
    """A bernoulli fit with covariates keys cells by (groups, covariate bin, arm). Every backend
    gives the NumPy reference's cells, each row in the bin its value falls in."""
    rng = np.random.default_rng(4)
    frame = make_rows(seed=4).with_columns(y=pl.Series(rng.integers(0, 2, 3000)),
                                           age=pl.col("age").round(0))   # ties at the edges
    data, rows = write_sources(frame, tmp_path)[kind]
    results = {}
    for backend in BACKENDS:
        spec = spec_for(backend, cluster, family="bernoulli", covariate_bins=5)
        checked = validate.check(validate.resolve_source(data), spec)
        results[backend] = reduce(checked, spec)
    edges = checked.bin_edges
    assert [len(edges[c]) for c in ("pre", "age")] == [4, 4]
    pre_bin = np.searchsorted(edges["pre"], rows["pre"].to_numpy(), side="left")
    age_bin = np.searchsorted(edges["age"], rows["age"].to_numpy(), side="left")
    binned = rows.with_columns(covariate_bin=pl.Series(pre_bin + 5 * age_bin, dtype=pl.Int32))
    keys = ["country", "region", "covariate_bin"]
    reference = reference_cells(binned, keys, ["pre", "age"])
    for backend, cells in results.items():
        assert cells.levels == ("country", "region") and cells.extra_keys == ("covariate_bin",)
        assert_cells_agree(cells.table.sort([*keys, "arm"]), reference, keys, ["pre", "age"])
    # Quantile bins: each holds about a fifth of the rows of each covariate.
    shares = np.bincount(pre_bin, minlength=5) / rows.height
    assert np.all(np.abs(shares - 0.2) < 0.03), shares


def _pair_route(batch):
    """The reference group-by: Polars' in-memory engine on the (group, arm) pair."""
    from engine.reduce.polars import cell_aggregates, sum_columns

    keys = ["g", "arm"]
    return (batch.lazy().with_columns(sum_columns(["x"], "y")).group_by(keys)
            .agg(cell_aggregates("y", ["x"])).sort(keys).collect(engine="in-memory"))


def _integer_key_rows(dtype, spacing=1, size=20_000, seed=7):
    rng = np.random.default_rng(seed)
    low = 0 if dtype in (pl.UInt16, pl.UInt64) else -50
    key = rng.integers(low, 60, size)
    arm = rng.integers(0, 2, key.size)
    arm[key == 3] = 0                                   # a one-arm group
    return pl.DataFrame({"g": pl.Series(key * spacing).cast(dtype), "arm": pl.Series(arm).cast(pl.Int8),
                         "y": rng.normal(1e9, 1.0, key.size), "x": rng.normal(size=key.size)})


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Int32])
def test_one_integer_key_path_gives_the_same_bits(dtype):
    """reduce_batch's single-integer-key route for keys too spread out to index (group·2 + arm
    as one hashed key) against grouping on the (group, arm) pair: the same cells, bit for bit,
    including negative keys, one-arm groups and keys too large for the route (which fall back)."""
    from engine.reduce.polars import _dense_integer_span, reduce_batch

    frame = _integer_key_rows(dtype, spacing=1_000_003)
    assert _dense_integer_span(frame, ["g"], "y", ["x"]) is None      # not the dense route
    got = reduce_batch(frame, ["g"], "y", ["x"])
    assert got.schema == _pair_route(frame).schema and got.equals(_pair_route(frame))
    if dtype == pl.Int64:
        huge = frame.with_columns(pl.col("g") * 1000 + 2**62)
        assert reduce_batch(huge, ["g"], "y", ["x"]).equals(_pair_route(huge))


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Int32, pl.Int16, pl.Int8, pl.UInt16, pl.UInt64])
def test_dense_integer_route_agrees_and_repeats(dtype):
    """Keys in a narrow range go through kernels.host (segment 2·(key − low) + arm): the same
    keys, arms and counts as the group-by, moments equal to float64 rounding at offset 1e9,
    the same schema, and the same bits on every call. Keys near the top of the type too."""
    from engine.reduce.polars import _dense_integer_span, reduce_batch

    frame = _integer_key_rows(dtype)
    if dtype == pl.UInt64:
        frame = frame.with_columns(pl.col("g") + (2**64 - 100))       # beyond Int64
    elif dtype == pl.Int64:
        frame = frame.with_columns(pl.col("g") + (2**63 - 100))
    elif dtype in (pl.Int8, pl.Int16):
        # A range wider than the type's half: key − low would wrap in the key's own type.
        top, step = (120, 2) if dtype == pl.Int8 else (30_000, 400)   # −100…120, −20000…30000
        frame = frame.with_columns(pl.when(pl.col("g") > 0).then(pl.lit(top, dtype))
                                   .otherwise(pl.col("g").cast(dtype) * step).alias("g"))
    assert _dense_integer_span(frame, ["g"], "y", ["x"]) is not None
    got, want = reduce_batch(frame, ["g"], "y", ["x"]), _pair_route(frame)
    assert got.schema == want.schema
    assert_cells_agree(got, reference_cells(frame, ["g"], ["x"], arm="arm"), ["g"], ["x"])
    assert_cells_agree(got, want, ["g"], ["x"])
    assert all(reduce_batch(frame, ["g"], "y", ["x"]).equals(got) for _ in range(3))
    cells = jax_backend.reduce_jax(frame.lazy(), ["g"], "y", ["x"])   # the jax backend's key encoding
    assert cells.table.schema == want.schema
    assert_cells_agree(cells, want, ["g"], ["x"])


def test_dense_runs_split_and_merge(monkeypatch):
    """Sorted keys (each batch a new range) overflow a dense run, which is handed to the tree
    merger and a new run begins; batches too wide for the route (a far key) interleave. The result
    equals one reduction of all rows, to rounding, whatever the batch size."""
    from engine.reduce import polars as backend

    monkeypatch.setattr(backend, "DENSE_MIN_KEYS", 8)
    monkeypatch.setattr(backend, "DENSE_MAX_KEYS", 60)  # a run holds at most 60 keys
    rng = np.random.default_rng(3)
    key = np.sort(rng.integers(0, 400, 6_000))
    key[::500] += 10**9                                  # a few far keys make some batches wide
    frame = pl.DataFrame({"g": key, "arm": rng.integers(0, 2, key.size).astype(np.int8),
                          "y": rng.normal(5.0, 2.0, key.size), "x": rng.normal(size=key.size)})
    pushed = []
    original = backend._DenseRun.table
    monkeypatch.setattr(backend._DenseRun, "table", lambda self: pushed.append(1) or original(self))
    want = reference_cells(frame, ["g"], ["x"], arm="arm")
    for batch_rows in (97, 300):
        pushed.clear()
        got = backend.reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=batch_rows)
        assert len(pushed) > 1
        assert_cells_agree(got, want, ["g"], ["x"])


def test_dense_run_over_drifting_keys_widens_geometrically(monkeypatch):
    """Sorted keys move the run's range every batch; its arrays grow by at least their own size,
    so 60 batches widen them a handful of times (not 59), and the cells are the same."""
    import numpy as np
    from engine.reduce import polars as backend

    monkeypatch.setattr(backend, "DENSE_MIN_KEYS", 8)
    rng = np.random.default_rng(5)
    key = np.sort(rng.integers(0, 3_000, 6_000))
    frame = pl.DataFrame({"g": key, "arm": rng.integers(0, 2, key.size).astype(np.int8),
                          "y": rng.normal(1e9, 2.0, key.size), "x": rng.normal(size=key.size)})
    widened = []
    original = backend._DenseRun._cover

    def cover(self, span):
        capacity = self.capacity
        original(self, span)
        widened.append(self.capacity != capacity)

    monkeypatch.setattr(backend._DenseRun, "_cover", cover)
    got = backend.reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=100)
    assert len(widened) == 59 and 0 < sum(widened) <= 8   # growing by each batch's range: ~59 widenings
    assert_cells_agree(got, reference_cells(frame, ["g"], ["x"], arm="arm"), ["g"], ["x"])


def test_merging_tables_stacks_the_cells_outside_the_shared_key_range():
    """Cell tables whose top-level keys do not overlap are stacked, and where their ranges
    overlap only the shared band is joined: the same cells as one reduction of all rows."""
    from engine import cells as cells_module

    frame = make_rows(seed=4, rows=2_000)
    low = frame.filter(pl.col("country") < frame["country"].median())
    high = frame.filter(pl.col("country") >= frame["country"].median())
    levels, covariates = ["country", "region"], ["pre", "age"]
    parts = [reference_cells(part, levels, covariates) for part in (high, low)]
    merged = cells_module.merge(parts, levels, covariates)
    assert_cells_agree(merged, reference_cells(frame, levels, covariates), levels, covariates)
    # Overlapping ranges (a shared middle band of countries): only the band is joined.
    cut = frame["country"].quantile(0.4), frame["country"].quantile(0.6)
    left = frame.filter(pl.col("country") <= cut[1])
    right = frame.filter(pl.col("country") >= cut[0])
    shared = frame.filter(pl.col("country").is_between(*cut))
    right = pl.concat([right.filter(~pl.col("country").is_between(*cut)), shared.head(shared.height // 2)])
    left = pl.concat([left.filter(~pl.col("country").is_between(*cut)), shared.tail(shared.height - shared.height // 2)])
    parts = [reference_cells(part, levels, covariates) for part in (left, right)]
    merged = cells_module.merge(parts, levels, covariates)
    assert_cells_agree(merged, reference_cells(frame, levels, covariates), levels, covariates)


def dense_route(route, monkeypatch):
    """``direct``: the compiled passes' one direct pass into a table a half
    (engine.reduce.fused.direct_sums, direct_fold) at any segment count; ``passes``: the dense
    route as it comes."""
    from engine.reduce import fused

    if route == "direct":
        if fused.PASSES is None:
            pytest.skip("numba is not installed")
        monkeypatch.setattr(fused, "DIRECT_SEGMENTS", 0)


@pytest.mark.parametrize("route", ["passes", "direct"])
@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_dense_run_of_repeated_keys_skips_the_first_pass(offset, route, monkeypatch):
    """Every batch after the first sees only keys the run has shifts for, so its first pass
    only counts; the sums about the first batch's means still give the exact moments, at
    offset 1e9 too, and a level that drifts between batches (by 50 sds) costs nothing."""
    from engine.reduce import polars as backend
    from kernels import host

    dense_route(route, monkeypatch)

    from engine.reduce import fused

    calls = []
    original, keyed, folded = host.accumulate, fused.keyed_sums, fused.direct_fold
    monkeypatch.setattr(host, "accumulate", lambda *a, **k: calls.append(k.get("seen")) or original(*a, **k))
    # The compiled passes take a batch whose segments all have shifts straight from the keys:
    # one counting pass (few segments) or one direct pass folded into the run (many).
    monkeypatch.setattr(fused, "keyed_sums", lambda *a: calls.append("keyed") or keyed(*a))
    monkeypatch.setattr(fused, "direct_fold", lambda *a, **k: calls.append("folded") or folded(*a, **k))
    if route == "direct":
        direct = fused.direct_sums
        monkeypatch.setattr(fused, "direct_sums", lambda *a, **k: calls.append(a[5] if len(a) > 5 else None)
                            or direct(*a, **k))
    rng = np.random.default_rng(11)
    rows = 6_000
    key = rng.integers(0, 20, rows)
    drift = 50.0 * np.arange(rows) / rows                 # later batches sit 50 sds higher
    frame = pl.DataFrame({"g": key, "arm": rng.integers(0, 2, rows).astype(np.int8),
                          "y": offset + drift + rng.normal(size=rows), "x": offset + rng.normal(size=rows)})
    got = backend.reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=500)
    assert calls[0] is None and len(calls) == 12
    later = {"passes": "keyed" if fused.PASSES is not None else None, "direct": "folded"}[route]
    assert all(seen == later if later else seen is not None and seen.all() for seen in calls[1:])
    assert_cells_agree(got, reference_cells(frame, ["g"], ["x"], arm="arm"), ["g"], ["x"])


_MEMORY_CHILD = r"""
import resource, sys
import polars as pl
from engine.reduce.polars import reduce_polars

folder, limit_mib, batch_rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


warm = pl.scan_parquet(f"{folder}/part000.parquet").head(1000)
reduce_polars(warm, ["key"], "y", [], batch_rows=batch_rows)       # imports, pools, buffers
base_rss = status("VmRSS")
# From here the process may not grow its data segment by more than the limit (enforced).
resource.setrlimit(resource.RLIMIT_DATA, (status("VmData") + limit_mib * 2**20, resource.RLIM_INFINITY))
cells = reduce_polars(pl.scan_parquet(f"{folder}/*.parquet"), ["key"], "y", [], batch_rows=batch_rows)
print(int(cells.table["n"].sum()), cells.table.height, (status("VmHWM") - base_rss) / 2**20)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
def test_polars_backend_streams_a_dataset_larger_than_its_memory_limit(tmp_path):
    """40e6 rows in 20 Parquet files, 680 MB as in-memory columns, reduced by a process whose
    data segment may grow by at most 200 MiB beyond its warmed-up size (RLIMIT_DATA, enforced
    by the kernel: an allocation past it fails). Every row is counted, and the peak RSS stays
    under the limit: the backend holds one batch (2¹⁸ rows here; the default 2²² rows peak
    at ~650 MB) and the cells, never the data."""
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    files, rows_per_file = 20, 2_000_000
    for i in range(files):
        pl.DataFrame({"key": rng.integers(0, 50_000, rows_per_file),
                      "arm": rng.integers(0, 2, rows_per_file).astype(np.int8),
                      "y": 1e9 + rng.standard_normal(rows_per_file)}).write_parquet(
            tmp_path / f"part{i:03d}.parquet", row_group_size=1 << 17)
    data_mib = files * rows_per_file * (8 + 1 + 8) / 2**20
    limit_mib = 200
    assert data_mib > 3 * limit_mib
    done = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path), str(limit_mib), str(1 << 18)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows, cells, peak_mib = done.stdout.split()
    assert int(rows) == files * rows_per_file and int(cells) == 100_000
    assert float(peak_mib) < limit_mib


@pytest.mark.parametrize("route", ["passes", "direct"])
def test_dense_run_refolds_a_segment_that_jumps_far_from_its_shift(route, monkeypatch):
    """Segment 0 has one row at 1e7 in the first batch, then 1.5e5 rows near 0 (1e7 sds
    away): summed about that first row, its M2 would carry a rounding of ~ε·√n·Σd², ~1e-8
    of itself. The run refolds such segments by Chan's update, so every cell matches exact
    rational moments to 1e-12; the other segments never need it."""
    from fractions import Fraction

    from engine.reduce import polars as backend

    dense_route(route, monkeypatch)
    rebased = []
    original = backend._DenseRun._rebase
    monkeypatch.setattr(backend._DenseRun, "_rebase", lambda self, far, *a: rebased.append(np.flatnonzero(far))
                        or original(self, far, *a))
    rng = np.random.default_rng(12)
    rows, batch_rows = 200_000, 50_000
    key = rng.integers(0, 3, rows)
    key[:batch_rows] = rng.integers(1, 3, batch_rows)            # segment 0 absent from batch 1 …
    key[0] = 0                                                   # … but for one row at 1e7
    y, x = rng.normal(size=rows), rng.normal(size=rows)
    y[0], x[0] = 1e7, -5e6
    frame = pl.DataFrame({"g": key, "arm": np.zeros(rows, np.int8), "y": y, "x": x})
    got = backend.reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=batch_rows).table
    assert len(rebased) == 1 and rebased[0].tolist() == [0]      # segment 0 (key 0, arm 0), batch 2
    for g in range(3):
        mask = key == g
        ys, xs = [Fraction(float(v)) for v in y[mask]], [Fraction(float(v)) for v in x[mask]]
        my, mx = sum(ys) / len(ys), sum(xs) / len(xs)
        row = got.filter(pl.col("g") == g)
        assert row["n"].item() == mask.sum()
        for column, exact in [("m2", sum((v - my) ** 2 for v in ys)), ("xx_m2__x__x", sum((v - mx) ** 2 for v in xs)),
                              ("xy_m2__x", sum((a - mx) * (b - my) for a, b in zip(xs, ys)))]:
            assert abs(row[column].item() - float(exact)) <= 1e-12 * abs(float(exact)), (g, column)


def test_host_passes_fused_and_numpy_give_the_same_cells(monkeypatch):
    """CAUSAL_ENGINE_HOST_PASSES picks the dense route's passes: the compiled loops
    (engine.reduce.fused, the default) or NumPy's bincount; the cells agree to float64 rounding,
    each repeats bit for bit, and any other value is a SpecError before any compute."""
    from engine.reduce import fused
    from engine.reduce.polars import host_passes, reduce_polars
    from kernels import host

    frame = _integer_key_rows(pl.Int64)
    monkeypatch.setenv("CAUSAL_ENGINE_HOST_PASSES", "numpy")
    assert host_passes() is host.NUMPY
    numpy_cells = reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=700)
    monkeypatch.setenv("CAUSAL_ENGINE_HOST_PASSES", "fused")
    assert host_passes() is (fused.PASSES or host.NUMPY)
    fused_cells = reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=700)
    assert reduce_polars(frame.lazy(), ["g"], "y", ["x"], batch_rows=700).table.equals(fused_cells.table)
    assert_cells_agree(fused_cells, numpy_cells, ["g"], ["x"])
    monkeypatch.setenv("CAUSAL_ENGINE_HOST_PASSES", "numba")
    with pytest.raises(SpecError, match="CAUSAL_ENGINE_HOST_PASSES='numba'"):
        host_passes()


@pytest.mark.parametrize("dtype, low, k, rows, batch_rows", [
    *[(dtype, low, k, 40_000, 5_000) for dtype, low in [(pl.Int64, -10**12), (pl.UInt64, 2**64 - 40), (pl.Int8, -100)]
      for k in (0, 1, 2)],
    (pl.Int64, 7, 1, 700_000, 300_000),                       # batches split in two parts (threads)
])
def test_keyed_batches_give_the_same_bits(dtype, low, k, rows, batch_rows, monkeypatch):
    """A dense run's later batches whose segments all have shifts go through one pass from the
    key and arm columns (engine.reduce.fused.keyed_sums): the same cells, bit for bit, as the
    segment-id route, for keys at the ends of their types, 0–2 covariates, batches in two parts."""
    from engine.reduce import fused
    from engine.reduce import polars as backend

    if fused.PASSES is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(30 + k)
    offsets = rng.integers(0, 25, rows)
    key = (pl.Series(offsets.astype(np.uint64) + np.uint64(low % 2**64)) if dtype == pl.UInt64
           else pl.Series(offsets + low)).cast(dtype)
    data = {"g": key, "arm": rng.integers(0, 2, rows).astype(np.int8), "y": 1e9 + rng.normal(size=rows)}
    data.update({f"x{j}": rng.normal(size=rows) for j in range(k)})
    frame, covariates = pl.DataFrame(data), [f"x{j}" for j in range(k)]
    calls = []
    keyed = fused.keyed_sums
    monkeypatch.setattr(fused, "keyed_sums", lambda *a: calls.append(1) or keyed(*a))
    got = backend.reduce_polars(frame.lazy(), ["g"], "y", covariates, batch_rows=batch_rows).table
    assert len(calls) == -(-rows // batch_rows) - 1          # every batch after the first
    monkeypatch.setattr(fused, "keyed_applies", lambda *a: False)
    assert got.equals(backend.reduce_polars(frame.lazy(), ["g"], "y", covariates, batch_rows=batch_rows).table)


def _string_rows(rows: int, groups: int, seed: int, width: int = 6) -> pl.DataFrame:
    """Keys ``k…k<int>`` of ``width`` characters (more than 12: stored apart from Arrow's views)."""
    rng = np.random.default_rng(seed)
    key = rng.integers(0, groups, rows) ** 2          # later keys first appear in later batches
    key[: rows // 3] %= 7
    return pl.DataFrame({"name": pl.Series(key).cast(pl.String).str.pad_start(width, "k"),
                         "arm": rng.integers(0, 2, rows).astype(np.int8),
                         "y": 1e6 + rng.standard_normal(rows), "x": rng.standard_normal(rows)})


@pytest.mark.parametrize("batch_rows, width", [(700, 6), (1 << 22, 6), (700, 30)])
def test_string_keys_are_coded_like_first_seen_integers(batch_rows, width):
    """One string group column is coded to integers in first-seen order and reduced on the
    dense route: the same bits as integer keys numbered that way, the strings put back, sorted
    by (key, arm); and the same cells as Polars' group-by over the strings to 1e-9."""
    from engine.reduce.polars import reduce_polars

    frame = _string_rows(5000, 900, seed=8, width=width)
    got = reduce_polars(frame.lazy(), ["name"], "y", ["x"], batch_rows=batch_rows).table
    assert got["name"].dtype == pl.String
    assert got.select(["name", "arm"]).equals(got.select(["name", "arm"]).sort(["name", "arm"]))

    first_seen = frame["name"].unique(maintain_order=True)
    coded = frame.with_columns(pl.col("name").replace_strict(first_seen, pl.int_range(first_seen.len(), eager=True)))
    by_int = reduce_polars(coded.lazy(), ["name"], "y", ["x"], batch_rows=batch_rows).table
    by_int = by_int.with_columns(first_seen.gather(by_int["name"]).alias("name")).sort(["name", "arm"])
    assert_frame_equal(got, by_int)

    grouped = reduce_polars(frame.lazy(), ["name"], "y", ["x"], batch_rows=batch_rows, key_codes=False).table
    assert_frame_equal(got, grouped, check_exact=False, rel_tol=1e-9)



def test_reduces_on_several_threads_at_once_give_each_its_own_cells():
    """Callers on several threads (a threaded Dask worker) share the one helper thread of the
    two-half loops and keep their own buffers and key tables: each gets the cells it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.reduce.polars import reduce_polars

    frames = [_string_rows(150_000, 3000, seed=s, width=w) for s, w in ((1, 6), (2, 30), (3, 6), (4, 30))]
    frames[2] = frames[2].with_columns(pl.col("name").str.len_bytes().cast(pl.Int64) * 1000 + pl.col("arm"))
    alone = [reduce_polars(f.lazy(), ["name"], "y", ["x"], batch_rows=1 << 17).table for f in frames]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda f: reduce_polars(f.lazy(), ["name"], "y", ["x"], batch_rows=1 << 17).table,
                                 frames * 2))
    for got, want in zip(together, alone * 2):
        assert_frame_equal(got, want)

def test_string_keys_with_nulls_take_the_group_by():
    """Null keys (rows that skipped validation) are not coded: the group-by's cells, a null
    key's arms apart."""
    from engine.reduce.polars import reduce_polars

    frame = pl.DataFrame({"g": ["b", None, "a", "b", None, "c"], "arm": pl.Series([0, 1, 0, 1, 0, 0], dtype=pl.Int8),
                          "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    got = reduce_polars(frame.lazy(), ["g"], "y", []).table
    assert_frame_equal(got, reduce_polars(frame.lazy(), ["g"], "y", [], key_codes=False).table)
    assert got.filter(pl.col("g").is_null())["arm"].to_list() == [0, 1]


@pytest.mark.parametrize("batch_rows", [600, 1 << 22])
def test_nested_keys_are_coded_as_one(batch_rows):
    """Several key columns (nested levels; here a string and an integer one) are coded as one:
    the group-by's cells to 1e-9, sorted by (keys, arm), the key columns exactly."""
    from engine.reduce.polars import reduce_polars

    rng = np.random.default_rng(10)
    rows = 4000
    region = rng.integers(0, 300, rows) ** 2
    frame = pl.DataFrame({"country": pl.Series(region % 17).cast(pl.String).str.pad_start(3, "c"),
                          "region": region, "arm": rng.integers(0, 2, rows).astype(np.int8),
                          "y": -1e6 + rng.standard_normal(rows)})
    keys = ["country", "region"]
    got = reduce_polars(frame.lazy(), keys, "y", [], batch_rows=batch_rows).table
    want = reduce_polars(frame.lazy(), keys, "y", [], batch_rows=batch_rows, key_codes=False).table
    assert got.columns == want.columns and got.schema == want.schema
    assert_frame_equal(got.select(*keys, "arm", "n"), want.select(*keys, "arm", "n"))
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9)


@pytest.mark.parametrize("name", ["__key_code", "_hash", "_code"])
def test_columns_named_like_the_codes_own_take_the_group_by(name):
    """A column the codes would overwrite (an outcome named ``__key_code``) keeps the group-by
    route, and its values; keys named like the old join's columns (``_hash``, ``_code``) are
    coded like any other, to the same cells."""
    from engine.reduce.polars import reduce_polars

    frame = pl.DataFrame({"g": ["a", "b", "a", "c"], "arm": pl.Series([0, 1, 1, 0], dtype=pl.Int8),
                          "v": [1.0, 2.0, 3.0, 4.0]})
    key, outcome = ("g", name) if name == "__key_code" else (name, "v")
    frame = frame.rename({"g": key, "v": outcome})
    got = reduce_polars(frame.lazy(), [key], outcome, []).table
    assert_frame_equal(got, reduce_polars(frame.lazy(), [key], outcome, [], key_codes=False).table)
    assert got["mean"].to_list() == [1.0, 3.0, 2.0, 4.0]


@pytest.mark.parametrize("broken_at", [None, 0, 2500])
@pytest.mark.parametrize("levels", [2, 3])
def test_nested_string_keys_take_the_last_levels_codes(broken_at, levels):
    """Nested string levels: while each region has one country the regions' codes are the
    whole key's (no table of pairs); a region claimed by a second country (in the first batch,
    or in a later one, after codes were given) moves the rest to the pairs. Either way the
    group-by's cells to 1e-9 and the key columns exactly."""
    from engine.reduce import polars as backend

    rng = np.random.default_rng(14)
    rows = 4000
    region = rng.integers(0, 300, rows) ** 2
    frame = pl.DataFrame({"continent": pl.Series(region % 3).cast(pl.String),
                          "country": pl.Series(region % 17).cast(pl.String).str.pad_start(3, "c"),
                          "region": pl.Series(region).cast(pl.String).str.pad_start(14, "r"),   # long strings
                          "arm": rng.integers(0, 2, rows).astype(np.int8), "y": -1e6 + rng.standard_normal(rows)})
    if broken_at is not None:
        frame = frame.with_columns(pl.when(pl.int_range(rows) == broken_at).then(pl.lit("c99"))
                                   .otherwise(pl.col("country")).alias("country"))
    keys = ["continent", "country", "region"][3 - levels:]
    codes = []
    original = backend._KeyCodes

    class Recorded(original):
        def __init__(self, *args):
            super().__init__(*args)
            codes.append(self)

    try:
        backend._KeyCodes = Recorded
        got = backend.reduce_polars(frame.lazy(), keys, "y", [], batch_rows=500).table
    finally:
        backend._KeyCodes = original
    assert (codes[0].nesting is None) == (broken_at is not None), "the route the test means to take"
    want = backend.reduce_polars(frame.lazy(), keys, "y", [], batch_rows=500, key_codes=False).table
    assert_frame_equal(got.select(*keys, "arm", "n"), want.select(*keys, "arm", "n"))
    assert_frame_equal(got, want, check_exact=False, rel_tol=1e-9)


def test_128_bit_integer_keys_take_the_group_by():
    """An Int128 key beside a string one is not coded (NumPy has no such dtype): the
    group-by's cells, as without codes."""
    from engine.reduce.polars import reduce_polars

    frame = pl.DataFrame({"s": ["a", "b", "a", "a"], "g": pl.Series([1, 2**70, 1, 2**70], dtype=pl.Int128),
                          "arm": pl.Series([0, 1, 1, 0], dtype=pl.Int8), "y": [1.0, 2.0, 3.0, 4.0]})
    got = reduce_polars(frame.lazy(), ["s", "g"], "y", []).table
    assert_frame_equal(got, reduce_polars(frame.lazy(), ["s", "g"], "y", [], key_codes=False).table)
    assert got.height == 4
