"""Shared test data builders."""
from __future__ import annotations

import polars as pl

import engine


def small_rows(seed=0, rows=400, groups=20, levels=("group",), covariate=False) -> pl.DataFrame:
    return engine.simulate(rows=rows, groups=groups, levels=levels, seed=seed, covariate=covariate).rows


FAST = dict(draws=150, warmup=150, chains=2)
