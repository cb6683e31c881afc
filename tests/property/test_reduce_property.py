"""Property: the polars, jax and dask backends agree on any data the validator accepts (the
polars backend also with its compiled passes' direct pass forced on at any size).

Random row counts, group counts and nesting, covariates, arms missing from
groups, one-row cells, ties, large offsets and tiny or huge spreads. The jax
backend runs fixed-size blocks and bucketed segment counts, so the examples
share a handful of compiled steps (checked). The dask backend runs on an
in-process cluster here (the process cluster is in tests/unit).
"""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import validate
from engine.reduce import jax as jax_backend
from engine.reduce.dask import reduce_dask
from engine.reduce.jax import reduce_jax
from engine.reduce.polars import reduce_polars
from engine.spec import Spec
from kernels import segments
from tests.unit.test_reduce_backends import assert_cells_agree, assert_same_layout

JAX_BLOCK_ROWS = 64
COMPILED: set = set()   # (segment bucket, covariates) the jax backend has been asked for


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as c:
        yield c


@st.composite
def datasets(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.integers(2, 300))
    groups = draw(st.integers(1, 60))
    depth = draw(st.sampled_from([0, 1, 2]))
    k = draw(st.integers(0, 2))
    offset = draw(st.sampled_from([0.0, 1e3, -1e6, 1e9]))
    spread = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    ties = draw(st.booleans())
    p_treated = draw(st.sampled_from([0.05, 0.5, 0.95]))  # many groups then lack an arm
    string_keys = draw(st.booleans())

    leaf = rng.integers(0, groups, rows)
    treated = (rng.random(rows) < p_treated).astype(np.int64)
    treated[:2] = [0, 1]                                   # the validator needs both arms somewhere
    noise = rng.standard_normal(rows)
    if ties:
        noise = np.round(noise)                            # repeated values, some cells with m2 = 0
    data = {"treated": treated, "y": offset + spread * (noise + 0.5 * treated + 0.1 * (leaf % 7))}
    for j in range(k):
        data[f"x{j}"] = offset * (j + 1) + spread * rng.standard_normal(rows)
    levels = []
    if depth >= 2:
        data["outer"] = leaf // 5
        levels.append("outer")
    if depth >= 1:
        data["leaf"] = [f"g{g}" for g in leaf] if string_keys else leaf - 10**12
        levels.append("leaf")
    frame = pl.DataFrame(data)
    options = dict(partition_rows=draw(st.integers(1, rows)), batch_rows=draw(st.integers(1, 100)))
    return frame, tuple(levels), tuple(f"x{j}" for j in range(k)), options


def _direct(reduce_fn):
    """``reduce_fn()`` with the compiled host passes' direct pass (a table a half,
    ``engine.reduce.fused.direct_sums``/``direct_fold``) at every segment count, or None
    without Numba."""
    from engine.reduce import fused

    if fused.PASSES is None:
        return None
    saved = fused.DIRECT_SEGMENTS
    fused.DIRECT_SEGMENTS = 0
    try:
        return reduce_fn()
    finally:
        fused.DIRECT_SEGMENTS = saved


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(datasets())
def test_backends_agree(client, dataset):
    frame, levels, covariates, options = dataset
    spec = Spec(outcome="y", treatment="treated", groups=levels, covariates=covariates)
    checked = validate.check(validate.resolve_source(frame), spec)

    polars_cells = reduce_polars(checked.rows, levels, "y", covariates, batch_rows=options["batch_rows"])
    direct_cells = _direct(lambda: reduce_polars(checked.rows, levels, "y", covariates,
                                                     batch_rows=options["batch_rows"]))
    traces = jax_backend.TRACES["accumulate"]
    jax_cells = reduce_jax(checked.rows, levels, "y", covariates, block_rows=JAX_BLOCK_ROWS)
    encoded_keys, _ = jax_backend.encode_cells(checked.rows.select([*levels, "arm"]).collect(), levels)
    key = (segments.bucket(2 * max(encoded_keys.height, 1), jax_backend.MIN_SEGMENTS), len(covariates))
    # A new trace only for a (segment bucket, covariate count) this test has not compiled yet.
    assert jax_backend.TRACES["accumulate"] - traces <= (key not in COMPILED)
    COMPILED.add(key)
    dask_cells = reduce_dask(checked, spec, client=client, **options)

    assert polars_cells.n_rows == frame.height
    for cells in (jax_cells, dask_cells) + ((direct_cells,) if direct_cells is not None else ()):
        assert_same_layout(cells, polars_cells)
        assert_cells_agree(cells, polars_cells, list(levels), list(covariates))


def test_examples_shared_compiled_steps():
    """Run after the property: 20 examples, at most one compile per (bucket, covariates)."""
    if not COMPILED:
        pytest.skip("the property test did not run")
    assert len(COMPILED) <= 3 * 2  # segment buckets 64 and 128, covariates 0–2
