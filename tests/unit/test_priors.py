from __future__ import annotations

import numpy as np
import pytest

from engine.models.gaussian import standardise_prior
from engine.priors import Prior, default_priors, parse_distribution, resolve_priors


def test_parse_each_family():
    assert parse_distribution("normal(0, 10)") == Prior("normal", (0.0, 10.0))
    assert parse_distribution("halfcauchy(5)") == Prior("halfcauchy", (5.0,))
    assert parse_distribution("student_t(3,0,2.5)") == Prior("student_t", (3.0, 0.0, 2.5))
    assert parse_distribution(" exponential( 2 ) ") == Prior("exponential", (2.0,))


def test_level_specific_scale_wins_over_all_levels():
    defaults = default_priors(0.0, 1.0, ["country", "region"], {})
    user = {"effect_scale.region": Prior("halfnormal", (0.1,)), "effect_scale": Prior("halfcauchy", (2.0,))}
    resolved = resolve_priors(defaults, user, ["country", "region"], [])
    assert resolved["effect_scale.country"] == Prior("halfcauchy", (2.0,))
    assert resolved["effect_scale.region"] == Prior("halfnormal", (0.1,))


@pytest.mark.parametrize("prior", [Prior("normal", (3.0, 2.0)), Prior("student_t", (4.0, 3.0, 2.0)),
                                   Prior("halfnormal", (2.0,)), Prior("halfcauchy", (2.0,)),
                                   Prior("exponential", (0.5,))])
def test_standardised_prior_is_the_law_of_the_transformed_value(prior):
    """Sample the prior, transform, and compare quantiles with the standardised prior's."""
    import numpyro.distributions as dist
    import jax

    from engine.models import to_numpyro

    shift = 0.0 if prior.family in ("halfnormal", "halfcauchy", "exponential") else 1.5
    scale = 4.0
    draws = np.asarray(to_numpyro(prior).sample(jax.random.PRNGKey(0), (20000,)))
    transformed = (draws - shift) / scale
    standard = np.asarray(to_numpyro(standardise_prior(prior, shift, scale)).sample(jax.random.PRNGKey(1), (20000,)))
    for q in (0.25, 0.5, 0.75):
        # Quantile standard error ≈ sqrt(q(1-q)/n)/density; 0.05 of an IQR is ~5 such errors here.
        iqr = np.subtract(*np.quantile(transformed, [0.75, 0.25]))
        assert abs(np.quantile(transformed, q) - np.quantile(standard, q)) < 0.05 * iqr
    assert isinstance(to_numpyro(prior), dist.Distribution)
