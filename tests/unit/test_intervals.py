"""Group intervals from few retained draws must still cover at their nominal rate.

Each node's kept draws are iid from its posterior (here N(0, 1)), so over many nodes the share
of intervals covering a fresh draw from the same posterior is the expected coverage; its
Monte Carlo standard error is sqrt(p(1 − p)/nodes).
"""
import numpy as np
import pytest

from engine.infer.summaries import interval_bounds, interval_rule

NODES = 40_000


@pytest.mark.parametrize("kept", [4, 33, 40, 134])
@pytest.mark.parametrize("interval", [0.9, 0.8])
def test_coverage_of_kept_draw_intervals(kept, interval):
    rng = np.random.default_rng(kept)
    draws = rng.standard_normal((kept, NODES))
    # The moments come from every draw (thousands), so they are close to exact.
    lower, upper = interval_bounds(draws, np.zeros(NODES), np.ones(NODES), interval)
    truth = rng.standard_normal(NODES)
    coverage = np.mean((lower <= truth) & (truth <= upper))
    se = np.sqrt(interval * (1 - interval) / NODES)
    assert abs(coverage - interval) < 4 * se, (kept, coverage)


def test_default_quantiles_would_undercover():
    """The failure this guards against: NumPy's default sample quantiles of 33 draws."""
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((33, NODES))
    lower, upper = np.quantile(draws, [0.05, 0.95], axis=0)
    truth = rng.standard_normal(NODES)
    coverage = np.mean((lower <= truth) & (truth <= upper))
    assert coverage < 0.9 - 4 * np.sqrt(0.09 / NODES)


def test_rule_is_recorded():
    assert "Weibull" in interval_rule(40, 0.9)
    assert "mean ± z·sd" in interval_rule(33, 0.9)


@pytest.mark.parametrize("n", [1, 2, 39, 40, 268])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weibull_quantiles_equal_numpys(n, dtype):
    from engine.infer.summaries import weibull_quantiles

    draws = np.random.default_rng(n).standard_normal((n, 500)).astype(dtype)
    probs = (0.0, 0.05, 0.1, 0.5, 0.95, 1.0)
    want = np.quantile(draws.astype(np.float64), probs, axis=0, method="weibull")
    np.testing.assert_allclose(np.stack(weibull_quantiles(draws, probs)), want, rtol=1e-12, atol=1e-12)
