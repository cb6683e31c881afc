"""Randomised experiments with known truth, for demos, tests and benchmarks.

Groups nest over ``levels`` (outermost first); leaf sizes follow a Zipf-like
long tail (a few groups with most rows, most groups with one or two); every
node's (baseline, effect) is its parent's plus Gaussian noise, exactly the
model the engine fits, so coverage can be checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from engine.errors import SpecError


@dataclass(frozen=True)
class Simulation:
    """Rows, the true effect of every group, the true ATE and the parameters.

    Unpacks as ``rows, truth = engine.simulate(...)``.
    """

    rows: pl.DataFrame
    truth: pl.DataFrame   # level, group, parent, effect, baseline, n
    ate: float            # row-weighted mean of the leaf effects (the estimand of summary "ate")
    params: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.rows, self.truth))


def _level_sizes(groups: int, n_levels: int) -> list[int]:
    sizes = [max(1, int(round(groups ** ((d + 1) / n_levels)))) for d in range(n_levels)]
    sizes[-1] = groups
    for d in range(n_levels - 2, -1, -1):
        sizes[d] = min(sizes[d], sizes[d + 1])
    return sizes


def simulate(rows: int = 20_000, groups: int = 1_000, levels=("group",), seed: int = 0, *,
             covariate: bool = False, effect_mean: float = 0.5, effect_scale: float = 0.3,
             baseline_mean: float | None = None, baseline_scale: float | None = None, noise: float = 2.0,
             slope: float = 1.5, zipf: float = 1.1, treated_share: float = 0.5,
             family: str = "gaussian") -> Simulation:
    """Simulate a randomised experiment with nested, long-tailed groups.

    ``effect_scale`` and ``baseline_scale`` are the total between-leaf sds,
    split evenly (in variance) across levels. ``family``: ``gaussian`` (y = α + τ·t + noise),
    ``bernoulli`` (y ~ Bernoulli(logit⁻¹(α + τ·t))), ``binomial`` (``trials`` 1–10 per row) or
    ``poisson`` (y ~ Poisson(exposure · exp(α + τ·t)), ``exposure`` in [0.5, 2]). For GLMs α, τ
    are on the link scale (defaults: baseline mean −2, i.e. a 12% base rate, sd 0.8) and the
    truth table adds ``outcome_effect`` (risk or rate difference averaged over the group's rows);
    ``ate`` is then the row average of the risk or rate difference. ``covariate``: a column
    ``pre`` that shifts the linear predictor by ``slope``·pre (pre ~ N(0, noise²) for the
    gaussian family, N(0, 1) for GLMs, whose ``slope`` is on the link scale).

    Example
    -------
    >>> rows, truth = simulate(rows=500, groups=50, seed=3)
    >>> rows.columns
    ['group', 'treated', 'y']
    """
    glm = family != "gaussian"
    if family not in ("gaussian", "bernoulli", "binomial", "poisson"):
        raise SpecError(f"simulate: unknown family {family!r}; expected gaussian, bernoulli, binomial or poisson")
    if baseline_mean is None:
        baseline_mean = -2.0 if glm else 10.0
    if baseline_scale is None:
        baseline_scale = 0.8 if glm else 1.0
    levels = [levels] if isinstance(levels, str) else list(levels)
    if rows < groups or groups < 1:
        raise SpecError(f"simulate: need rows ≥ groups ≥ 1, found rows={rows}, groups={groups}")
    if not levels:
        raise SpecError("simulate: need at least one level name")
    rng = np.random.default_rng(seed)
    sizes = _level_sizes(groups, len(levels))
    per_level_tau = effect_scale / np.sqrt(len(levels))
    per_level_alpha = baseline_scale / np.sqrt(len(levels))

    truth_frames, chain = [], []
    alpha_above, tau_above = np.array([baseline_mean]), np.array([effect_mean])
    keys_above = None
    for depth, (level, size) in enumerate(zip(levels, sizes)):
        if depth == 0:
            parent = np.zeros(size, dtype=np.int64)
        else:
            above = sizes[depth - 1]
            # Every parent gets at least one child; the rest are spread at random.
            parent = np.concatenate([np.arange(above), rng.integers(0, above, size - above)])
            parent = rng.permutation(parent)
        alpha = alpha_above[parent] + per_level_alpha * rng.standard_normal(size)
        tau = tau_above[parent] + per_level_tau * rng.standard_normal(size)
        keys = np.array([f"{level}-{i:0{len(str(size))}d}" for i in range(size)])
        truth_frames.append(pl.DataFrame({
            "level": level, "group": keys,
            "parent": None if depth == 0 else keys_above[parent],
            "effect": tau, "baseline": alpha,
        }, schema_overrides={"parent": pl.String}))
        alpha_above, tau_above, keys_above = alpha, tau, keys
        chain.append(parent)

    # Long tail: leaf g's share ∝ 1/(rank+1)^zipf; every leaf gets one row.
    weights = 1.0 / np.arange(1, groups + 1) ** zipf
    weights = rng.permutation(weights / weights.sum())
    leaf_n = 1 + rng.multinomial(rows - groups, weights)
    leaf = np.repeat(np.arange(groups), leaf_n)
    treated = rng.random(rows) < treated_share
    mu = alpha_above[leaf] + tau_above[leaf] * treated
    data = {}
    # Keys of every level for each row, walking up the parent chain from the leaves.
    code = leaf
    for depth in range(len(levels) - 1, -1, -1):
        data[levels[depth]] = truth_frames[depth]["group"].to_numpy()[code]
        if depth > 0:
            code = chain[depth][code]
    columns = {lv: data[lv] for lv in levels}
    offset = np.zeros(rows)
    if covariate:
        # Gaussian: pre ~ N(0, noise²); GLMs: pre ~ N(0, 1), ``slope`` on the link scale.
        pre = rng.standard_normal(rows) * (1.0 if glm else noise)
        offset = slope * pre
        mu = mu + offset
        columns["pre"] = pre
    columns["treated"] = treated.astype(np.int8)
    if family == "gaussian":
        columns["y"] = mu + noise * rng.standard_normal(rows)
    elif family == "bernoulli":
        columns["y"] = (rng.random(rows) < 1 / (1 + np.exp(-mu))).astype(np.int8)
    elif family == "binomial":
        trials = rng.integers(1, 11, rows)
        columns["y"], columns["trials"] = rng.binomial(trials, 1 / (1 + np.exp(-mu))), trials
    else:
        exposure = rng.uniform(0.5, 2.0, rows)
        columns["y"], columns["exposure"] = rng.poisson(exposure * np.exp(mu)), exposure
    frame = pl.DataFrame(columns)

    leaf_rows = np.bincount(leaf, minlength=groups)
    truth_frames[-1] = truth_frames[-1].with_columns(pl.Series("n", leaf_rows, dtype=pl.Int64))
    if glm:
        inverse = (lambda e: 1 / (1 + np.exp(-e))) if family != "poisson" else np.exp
        # Each row's risk (rate) difference at its own covariate, averaged over the leaf's rows.
        row_effect = inverse(alpha_above[leaf] + tau_above[leaf] + offset) - inverse(alpha_above[leaf] + offset)
        leaf_effect = np.bincount(leaf, row_effect, minlength=groups) / leaf_rows
        truth_frames[-1] = truth_frames[-1].with_columns(
            pl.Series("outcome_effect", leaf_effect), pl.Series("_weighted", leaf_effect * leaf_rows))
    for depth in range(len(levels) - 2, -1, -1):
        below = truth_frames[depth + 1]
        sums = [pl.col("n").sum()] + ([pl.col("_weighted").sum()] if glm else [])
        counts = below.group_by("parent").agg(sums)
        truth_frames[depth] = truth_frames[depth].join(counts.rename({"parent": "group"}), on="group",
                                                       how="left", maintain_order="left")
        if glm:
            truth_frames[depth] = truth_frames[depth].with_columns(
                (pl.col("_weighted") / pl.col("n")).alias("outcome_effect"))
    truth = pl.concat([t.drop("_weighted") if glm else t for t in truth_frames], how="diagonal")
    ate = float(np.sum((leaf_effect if glm else tau_above) * leaf_rows) / rows)
    params = {"rows": rows, "groups": groups, "levels": levels, "level_sizes": sizes, "seed": seed,
              "effect_mean": effect_mean, "effect_scale": effect_scale, "baseline_mean": baseline_mean,
              "baseline_scale": baseline_scale, "noise": noise, "slope": slope if covariate else None,
              "zipf": zipf, "treated_share": treated_share, "family": family}
    return Simulation(rows=frame, truth=truth, ate=ate, params=params)
