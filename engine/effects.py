"""Posterior draws → effects: every group at every level, the ATE, a new group.

Reads draws; never refits.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from engine.encode import Encoding
from engine.infer import Posterior

EFFECT_COLUMNS = {
    "level": pl.String, "group": pl.String, "parent": pl.String,
    "n": pl.Int64, "n_treated": pl.Int64,
    "mean": pl.Float64, "sd": pl.Float64, "lower": pl.Float64, "upper": pl.Float64,
    "prob_positive": pl.Float64,
    "link_mean": pl.Float64, "link_sd": pl.Float64, "link_lower": pl.Float64, "link_upper": pl.Float64,
}


def interval_summary(draws: np.ndarray, interval: float) -> dict:
    """Mean, sd and the central ``interval`` of draws over their leading (chain, draw) axes."""
    flat = draws.reshape(-1, *draws.shape[2:])
    lo, hi = np.quantile(flat, [(1 - interval) / 2, (1 + interval) / 2], axis=0)
    return {"mean": flat.mean(axis=0), "sd": flat.std(axis=0, ddof=1), "lower": lo, "upper": hi}


def scalar_summary(draws: np.ndarray, interval: float) -> dict:
    return {k: float(v) for k, v in interval_summary(draws, interval).items()}


def group_effects(posterior: Posterior, encoding: Encoding) -> pl.DataFrame:
    frames = []
    for depth, level in enumerate(encoding.levels):
        nodes = encoding.nodes[depth]
        summary = posterior.groups[depth]
        parent = (pl.lit(None, dtype=pl.String) if depth == 0
                  else pl.col(encoding.levels[depth - 1]).cast(pl.String))
        frames.append(nodes.select(
            pl.lit(level).alias("level"), pl.col(level).cast(pl.String).alias("group"),
            parent.alias("parent"), pl.col("n").cast(pl.Int64), pl.col("n_treated").cast(pl.Int64),
        ).with_columns(
            pl.Series("mean", summary.mean), pl.Series("sd", summary.sd),
            pl.Series("lower", summary.lower), pl.Series("upper", summary.upper),
            pl.Series("prob_positive", summary.prob_positive),
            *_link_columns(posterior.link_groups[depth] if posterior.link_groups else None),
        ))
    if not frames:
        return pl.DataFrame(schema=EFFECT_COLUMNS)
    return pl.concat(frames).cast(EFFECT_COLUMNS).select(list(EFFECT_COLUMNS))


def _link_columns(summary) -> list:
    """The link-scale columns: the GLM's log odds / log rate ratio, null for the Gaussian."""
    names = ("link_mean", "link_sd", "link_lower", "link_upper")
    if summary is None:
        return [pl.lit(None, dtype=pl.Float64).alias(c) for c in names]
    return [pl.Series(c, v) for c, v in zip(names, (summary.mean, summary.sd, summary.lower, summary.upper))]


def population(posterior: Posterior, interval: float) -> dict:
    """The summary.json blocks that describe the whole population."""
    hyper = {name: scalar_summary(draws, interval) for name, draws in posterior.hyper.items()}
    return {
        "ate": scalar_summary(posterior.ate, interval),
        "new_group": scalar_summary(posterior.new_group, interval),
        "hyper": hyper,
        **({"ate_link": scalar_summary(posterior.ate_link, interval),
            "new_group_link": scalar_summary(posterior.new_group_link, interval)}
           if posterior.ate_link is not None else {}),
    }
