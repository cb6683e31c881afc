"""`exact` and full joint `nuts` sample the same posterior, within Monte Carlo error."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import engine
from engine.infer.diagnostics import ess_bulk


@pytest.fixture(scope="module")
def both():
    sim = engine.simulate(rows=1_200, groups=25, levels=["country", "region"], seed=77, covariate=True)
    kwargs = dict(outcome="y", treatment="treated", groups=["country", "region"], covariates=["pre"],
                  draws=1000, warmup=1000, chains=2)
    exact = engine.fit(sim.rows, method="exact", seed=3, **kwargs)
    nuts = engine.fit(sim.rows, method="nuts", seed=4, **kwargs)
    return exact, nuts


def mcse(draws):
    """Monte Carlo standard error of the mean from the bulk ESS."""
    return draws.std() / np.sqrt(ess_bulk(draws.reshape(draws.shape[0], draws.shape[1], 1))[0])


@pytest.mark.parametrize("name", ["baseline_mean", "effect_mean", "noise", "slope.pre",
                                  "baseline_scale.region", "effect_scale.region"])
def test_hyperparameters_agree(both, name):
    exact, nuts = both
    a, b = exact.posterior.hyper[name], nuts.posterior.hyper[name]
    tolerance = 4 * np.hypot(mcse(a), mcse(b))
    assert abs(a.mean() - b.mean()) < tolerance, (name, a.mean(), b.mean(), tolerance)


def test_ate_agrees(both):
    exact, nuts = both
    a, b = exact.posterior.ate, nuts.posterior.ate
    assert abs(a.mean() - b.mean()) < 4 * np.hypot(mcse(a), mcse(b))
    assert a.std() == pytest.approx(b.std(), rel=0.15)


def test_group_effects_agree(both):
    exact, nuts = both
    e = exact.effects().join(nuts.effects(), on=["level", "group"], suffix="_nuts")
    # The joint sampler's per-group ESS is lower than its hyperparameters'; bound the
    # MC error of each difference by the posterior sd over a conservative ESS of 200.
    z = (e["mean"] - e["mean_nuts"]) / (e["sd_nuts"] * np.sqrt(2 / 200))
    assert (z.abs() < 4.5).all(), e.with_columns(z=z).sort(pl.col("z").abs(), descending=True).head(3)
    assert np.allclose(e["sd"], e["sd_nuts"], rtol=0.2)


@pytest.fixture(scope="module")
def with_options():
    sim = engine.simulate(rows=1_500, groups=40, levels=["country", "region"], seed=3)
    kwargs = dict(outcome="y", treatment="treated", groups=["country", "region"], noise_by_arm=True,
                  correlated=True, draws=1000, warmup=1000, chains=2)
    return (engine.fit(sim.rows, method="exact", seed=5, **kwargs),
            engine.fit(sim.rows, method="nuts", seed=6, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["noise.control", "noise.treated", "correlation.region", "effect_scale.region",
                                  "effect_mean"])
def test_per_arm_noise_and_correlation_agree(with_options, name):
    exact, nuts = with_options
    a, b = exact.posterior.hyper[name], nuts.posterior.hyper[name]
    assert abs(a.mean() - b.mean()) < 4 * np.hypot(mcse(a), mcse(b)), (name, a.mean(), b.mean())
