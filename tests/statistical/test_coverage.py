"""Partial pooling on long-tail data with known truth: calibrated and better than no pooling."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import engine


@pytest.fixture(scope="module")
def fitted():
    sim = engine.simulate(rows=20_000, groups=1_000, levels=["group"], seed=2024)
    result = engine.fit(sim.rows, outcome="y", treatment="treated", groups=["group"], draws=500,
                        warmup=500, chains=4, seed=1)
    return sim, result


def test_group_intervals_cover_the_truth(fitted):
    sim, result = fitted
    assert result.summary["method"] == "exact"
    assert result.summary["diagnostics"]["ok"], result.summary["diagnostics"]
    groups = result.effects("group").join(sim.truth.select("group", pl.col("effect").alias("true")), on="group")
    assert groups.height == 1_000
    covered = ((groups["lower"] <= groups["true"]) & (groups["true"] <= groups["upper"])).mean()
    # 1,000 groups: the binomial sd of the coverage is ~0.01, so 0.85–0.95 is a wide ±5 sd band.
    assert 0.85 <= covered <= 0.95, covered


def test_pooling_beats_raw_differences(fitted):
    sim, result = fitted
    raw = (sim.rows.group_by("group", "treated").agg(pl.col("y").mean())
           .pivot(on="treated", index="group", values="y")
           .select("group", (pl.col("1") - pl.col("0")).alias("raw")).drop_nulls())
    both = (result.effects("group").join(raw, on="group")
            .join(sim.truth.select("group", pl.col("effect").alias("true")), on="group"))
    assert both.height > 500  # groups with both arms, where a raw difference exists
    rmse_pooled = np.sqrt(((both["mean"] - both["true"]) ** 2).mean())
    rmse_raw = np.sqrt(((both["raw"] - both["true"]) ** 2).mean())
    assert rmse_pooled < rmse_raw, (rmse_pooled, rmse_raw)


def test_ate_interval_contains_the_sample_ate(fitted):
    sim, result = fitted
    ate = result.ate()
    assert ate["lower"] <= sim.ate <= ate["upper"], (ate, sim.ate)
