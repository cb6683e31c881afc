"""`svi`: the minibatch ELBO estimator, the stopping rule, and fits checked against `laplace`."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import engine  # noqa: E402
from engine.infer import svi  # noqa: E402
from engine.priors import Prior  # noqa: E402

PRIORS = (("baseline_mean", Prior("normal", (-1.5, 2.5))), ("effect_mean", Prior("normal", (0.0, 1.0))),
          ("baseline_scale.leaf", Prior("halfnormal", (1.0,))), ("baseline_scale.top", Prior("halfnormal", (1.0,))),
          ("correlation.leaf", Prior("lkj", (2.0,))),
          ("effect_scale.leaf", Prior("halfnormal", (0.5,))), ("effect_scale.top", Prior("halfnormal", (0.5,))))


def two_level_problem(rng, link):
    """A padded tree (3 of 8 top nodes, 20 of 24 leaves real) with random cell totals."""
    levels, num_nodes, real_nodes = ("top", "leaf"), (8, 24), (3, 20)
    leaf_parent = np.concatenate([rng.integers(0, 3, 20), np.zeros(4, int)]).astype(np.int32)
    size = rng.integers(1, 40, (24, 2)).astype(float)
    size[20:] = 0.0
    size[rng.random((24, 2)) < 0.1] = 0.0  # a few missing arms
    rate = 0.2 if link == "logit" else 0.5
    successes = rng.binomial(size.astype(int), rate).astype(float) if link == "logit" else \
        rng.poisson(size * rate).astype(float)
    leaves = svi.DenseLeaves(jnp.asarray(successes), jnp.asarray(size))
    return leaves, (jnp.asarray(leaf_parent),), jnp.asarray(real_nodes), levels, num_nodes


def random_guide(rng, num_nodes, structured=True):
    """A guide away from its starting point: random means, sds, factor and slopes."""
    params = svi.init_params(PRIORS, num_nodes, rank=2 if structured else 0, structured=structured, centring=1.0)
    return jax.tree.map(lambda x: jnp.asarray(x + 0.3 * rng.standard_normal(x.shape)), params)


@pytest.mark.parametrize("link,centring", [("logit", 1.0), ("log", 0.0)])
def test_minibatch_elbo_is_unbiased_for_the_full_batch_elbo(link, centring):
    """Fixed guide and fixed draws: minibatches of B leaves drawn uniformly, each scaled G / B,
    average to the full-batch ELBO within Monte Carlo error."""
    rng = np.random.default_rng(20240611)
    leaves, parents, real_nodes, levels, num_nodes = two_level_problem(rng, link)
    params = random_guide(rng, num_nodes)
    noise = svi.draw_noise(jax.random.PRNGKey(3), params, num_nodes[-1])
    elbo = jax.jit(lambda index, weight, leaf_noise: svi.elbo_estimate(
        params, noise._replace(leaf=leaf_noise), index, weight, leaves, parents, real_nodes, priors=PRIORS,
        levels=levels, num_nodes=num_nodes, link=link, centring=centring))

    index, weight = svi.leaf_batch(None, real_nodes[-1], num_leaves=num_nodes[-1], batch=num_nodes[-1])
    full = float(elbo(index, weight, noise.leaf))
    assert np.isfinite(full)

    batch, repeats = 5, 2000
    keys = jax.random.split(jax.random.PRNGKey(7), repeats)
    sample = jax.vmap(lambda key: svi.leaf_batch(key, real_nodes[-1], num_leaves=num_nodes[-1], batch=batch))
    indices, weights = sample(keys)
    assert int(indices.max()) < int(real_nodes[-1])  # padding leaves are never drawn
    estimates = np.asarray(jax.vmap(lambda i, w: elbo(i, w, noise.leaf[i]))(indices, weights))
    error = estimates.std(ddof=1) / np.sqrt(repeats)
    assert estimates.std() > 0
    assert abs(estimates.mean() - full) < 4 * error, (estimates.mean(), full, error)


def test_hyper_entropy_matches_the_dense_covariance():
    rng = np.random.default_rng(11)
    params = random_guide(rng, (8, 24))
    cov = params.hyper_factor @ params.hyper_factor.T + jnp.diag(jnp.exp(2 * params.hyper_log_sd))
    d = cov.shape[0]
    dense = 0.5 * d * np.log(2 * np.pi * np.e) + 0.5 * np.linalg.slogdet(np.asarray(cov))[1]
    assert np.isclose(float(svi.hyper_entropy(params)), dense, rtol=1e-12)


def test_stopping_rule_waits_for_a_rising_elbo_and_stops_on_a_flat_one():
    rng = np.random.default_rng(5)
    rising = list(-1000.0 + 5.0 * np.arange(12) + rng.normal(0, 0.5, 12))
    gain, threshold = svi.projected_gain(rising)
    assert gain > threshold
    flat = list(-1000.0 + rng.normal(0, 0.5, 12))
    gain, threshold = svi.projected_gain(flat)
    assert gain < threshold
    assert svi.projected_gain(flat[: svi.WINDOW_CHUNKS])[0] == np.inf  # the first chunk never counts


def combined_overlap(a: dict, b: dict) -> float:
    return abs(a["mean"] - b["mean"]) / np.hypot(a["sd"], b["sd"])


def test_bernoulli_svi_agrees_with_laplace():
    rows, truth = engine.simulate(rows=3000, groups=60, seed=5, family="bernoulli")
    fits = {}
    for method in ("svi", "laplace"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # laplace's short chains may warn; svi's diagnostics are checked below
            fits[method] = engine.fit(rows, outcome="y", treatment="treated", groups=["group"], family="bernoulli",
                                      method=method, draws=200, warmup=200, chains=2, seed=1)
    result = fits["svi"]
    assert result.summary["method"] == "svi"
    table = result.effects()
    for column in ("mean", "sd", "lower", "upper", "link_mean", "link_sd", "link_lower", "link_upper"):
        assert np.isfinite(table[column].to_numpy()).all(), column
    assert "ate_link" in result.summary and "new_group_link" in result.summary
    diagnostics = result.summary["diagnostics"]
    assert diagnostics["ok"] and diagnostics["messages"] == []
    sampler = result.provenance["sampler"]
    assert sampler["converged"] and sampler["steps"] <= svi.MAX_STEPS and sampler["batch"] == 64
    assert {"learning_rate", "guide", "elbo", "chunks", "stopping"} <= set(sampler)
    for scale in ("ate", "ate_link"):
        assert combined_overlap(result.summary[scale], fits["laplace"].summary[scale]) < 3.0, scale
    # Group effects: the link-scale means track laplace's (both shrink the same data).
    svi_link = table["link_mean"].to_numpy()
    laplace_link = fits["laplace"].effects()["link_mean"].to_numpy()
    assert np.corrcoef(svi_link, laplace_link)[0, 1] > 0.9


def test_poisson_two_levels_with_exposure_in_minibatches(monkeypatch):
    """Two levels, exposure, and leaves drawn in minibatches of 16 (of 60 real leaves)."""
    monkeypatch.setattr(svi, "MAX_BATCH", 16)
    sim = engine.simulate(rows=3000, groups=60, seed=5, family="poisson", levels=("country", "region"))
    result = engine.fit(sim.rows, outcome="y", treatment="treated", groups=["country", "region"], family="poisson",
                        exposure="exposure", method="svi", draws=300, chains=2, seed=2)
    assert result.provenance["sampler"]["batch"] == 16
    assert result.summary["diagnostics"]["ok"]
    table = result.effects()
    assert table["level"].unique().sort().to_list() == ["country", "region"]
    for column in ("mean", "sd", "link_mean", "link_sd", "link_lower", "link_upper"):
        assert np.isfinite(table[column].to_numpy()).all(), column
    ate = result.summary["ate"]
    assert abs(ate["mean"] - sim.ate) < 4 * ate["sd"], (ate, sim.ate)
    assert np.isfinite(result.summary["ate_link"]["mean"])
