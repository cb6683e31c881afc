"""kernels.configurations against the Gaussian-tree kernel on the same cells (float64).

The configuration marginal is an exact rewrite of the one-level tree marginal, so value and
gradient must agree to rounding; the leaf posterior must match the tree's exact moments, and
its draws their mean and covariance within Monte Carlo error.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import configurations as cf
from kernels import gaussian_tree as gt


@pytest.fixture(autouse=True)
def _x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def random_cells(rng, leaves):
    """Cells with one or both arms per leaf, sometimes two cells for one (leaf, arm) (data
    merged from two sites), one leaf with no cells at all, and padding cells holding NaN."""
    cells = []
    for g in range(leaves - 1):
        arms = [(0,), (1,), (0, 1), (0, 1, 1)][rng.integers(4)]
        for a in arms:
            n = int(rng.choice([1, 1, 2, 3, 8, 40]))
            cells.append((n, rng.normal(0.5 * a, 1.0), rng.exponential() * (n - 1), a, g))
    cells += [(0, np.nan, np.nan, 0, 0)] * 3
    n, mean, m2, arm, leaf = (np.array(c) for c in zip(*cells))
    return n.astype(float), mean, m2, arm.astype(float), leaf.astype(np.int32)


def hyper(p):
    s_a, s_t, rho = p[2], p[3], p[4]
    cov = jnp.array([[s_a**2, rho * s_a * s_t], [rho * s_a * s_t, s_t**2]])[None]
    return cov, p[:2]


@pytest.mark.parametrize("per_arm", [False, True])
def test_marginal_matches_tree(per_arm):
    rng = np.random.default_rng(7)
    leaves = 200
    n, mean, m2, arm, leaf = random_cells(rng, leaves)
    configs = jax.tree.map(jnp.asarray, cf.leaf_configurations(n, mean, m2, arm, leaf, leaves,
                                                               pad_fn=lambda k: k + 3))
    assert cf.configuration_count(configs) < leaves  # the point: fewer configurations than leaves
    clean = np.nan_to_num

    def noise(p):
        return jnp.stack([p[5], 1.4 * p[5]]) if per_arm else p[5]

    def by_configurations(p):
        cov, mu = hyper(p)
        return cf.configuration_log_marginal(configs, cov, mu, noise(p))

    def by_tree(p):
        cov, mu = hyper(p)
        var = noise(p)
        cell_var = jnp.where(jnp.asarray(arm) > 0.5, var[1], var[0]) if per_arm else var
        return gt.gaussian_log_marginal(jnp.asarray(n), jnp.asarray(clean(mean)), jnp.asarray(clean(m2)),
                                        jnp.asarray(arm), jnp.asarray(leaf), (), cov, mu, cell_var,
                                        num_leaves=leaves)[0]

    for p in (jnp.array([0.1, 0.3, 0.9, 0.4, 0.5, 1.2]), jnp.array([-1.0, 2.0, 2.5, 0.05, -0.7, 0.3])):
        np.testing.assert_allclose(by_configurations(p), by_tree(p), rtol=1e-12)
        np.testing.assert_allclose(jax.grad(by_configurations)(p), jax.grad(by_tree)(p), rtol=1e-9, atol=1e-9)
        # The fused JVP rule in forward mode too, and a tangent in the data (which falls back
        # to differentiating the formula) against a central difference.
        np.testing.assert_allclose(jax.jacfwd(by_configurations)(p), jax.grad(by_tree)(p), rtol=1e-9, atol=1e-9)
        cov, mu = hyper(p)

        def of_means(shift):
            moved = configs._replace(both_mean=configs.both_mean + shift, one_mean=configs.one_mean + shift)
            return cf.configuration_log_marginal(moved, cov, mu, noise(p))

        _, slope = jax.jvp(of_means, (0.0,), (1.0,))
        h = 1e-5
        np.testing.assert_allclose(slope, (of_means(h) - of_means(-h)) / (2 * h), rtol=1e-6)


def test_configurations_count_rows_and_pairs():
    # leaf 0: arm 0 from two cells (2 + 1 rows), arm 1 one row; leaf 1: arm 0 only; leaf 2: arm 1 only
    n = np.array([2.0, 1.0, 1.0, 4.0, 5.0, 0.0])
    mean = np.array([1.0, 4.0, 0.5, -1.0, 2.0, 0.0])
    m2 = np.array([0.5, 0.0, 0.0, 3.0, 1.0, 0.0])
    arm = np.array([0, 0, 1, 0, 1, 0])
    leaf = np.array([0, 0, 0, 1, 2, 0])
    c = cf.leaf_configurations(n, mean, m2, arm, leaf, 3)
    assert c.both_count.tolist() == [1.0] and c.both_rows.tolist() == [[3.0, 1.0]]
    assert c.both_mean.tolist() == [[2.0, 0.5]]  # (2·1 + 1·4) / 3
    assert sorted(zip(c.one_arm.tolist(), c.one_rows.tolist())) == [(0.0, 4.0), (1.0, 5.0)]
    assert c.arm_rows.tolist() == [7.0, 6.0] and c.arm_pairs.tolist() == [2.0, 2.0]
    # within-pair: 0.5 + 0 + 2·(1 − 2)² + 1·(4 − 2)² = 6.5 for leaf 0 arm 0, plus leaf 1's 3.0
    assert c.arm_within.tolist() == [9.5, 1.0]
    np.testing.assert_allclose(c.log_rows, np.log([3.0, 1.0, 4.0, 5.0]).sum())


def test_leaf_posterior_matches_tree_moments():
    rng = np.random.default_rng(3)
    leaves = 60
    n, mean, m2, arm, leaf = random_cells(rng, leaves)
    mean = np.nan_to_num(mean)
    cov, mu = hyper(jnp.array([0.2, -0.1, 1.1, 0.6, 0.3, 0.0]))
    variance = jnp.array([0.8, 1.3])
    cell_var = jnp.where(jnp.asarray(arm) > 0.5, variance[1], variance[0])
    leaf_j, leaf_h = gt.gaussian_leaf_information(jnp.asarray(n), jnp.asarray(mean), jnp.asarray(arm),
                                                  jnp.asarray(leaf), leaves, cell_var)
    upward = gt.integrate(leaf_j, leaf_h, (), cov, mu)
    (tree_mean,), (tree_cov,) = gt.posterior_moments(upward, (), cov, mu)
    arms = jax.tree.map(jnp.asarray, cf.leaf_arms(n, mean, arm, leaf, leaves))
    _, cond_mean, cond_var = cf.leaf_effect_draw(jax.random.PRNGKey(0), arms, cov, mu, variance)
    np.testing.assert_allclose(cond_mean, np.asarray(tree_mean)[:, 1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cond_var, np.asarray(tree_cov)[:, 1, 1], rtol=1e-10, atol=1e-12)

    draws = np.asarray(jax.vmap(lambda k: cf.leaf_effect_draw(k, arms, cov, mu, variance)[0])(
        jax.random.split(jax.random.PRNGKey(1), 4000)))
    sd = np.sqrt(np.asarray(cond_var))
    # Each leaf's effect draws: mean within 4.5 Monte Carlo standard errors, and variance
    # within 4.5 standard errors of a normal sample variance (sd · sqrt(2/(n − 1))), 60 leaves.
    z = (draws.mean(0) - np.asarray(cond_mean)) / (sd / np.sqrt(4000))
    assert np.abs(z).max() < 4.5
    ratio = draws.var(0, ddof=1) / sd**2
    assert np.abs(ratio - 1).max() < 4.5 * np.sqrt(2 / 3999)


def test_one_pass_gives_both_forms():
    rng = np.random.default_rng(11)
    n, mean, m2, arm, leaf = random_cells(rng, 50)
    configs, arms = cf.one_level(n, mean, m2, arm, leaf, 50)
    for got, want in zip(configs, cf.leaf_configurations(n, mean, m2, arm, leaf, 50)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(arms, cf.leaf_arms(n, mean, arm, leaf, 50)):
        np.testing.assert_array_equal(got, want)


def test_expansion_remainder_bounds_the_taylor_error():
    """The constant is sup|Φ^(K+1)| / (K+1)!: at random points the series' error stays within
    it times δ^(K+1), and the bound is attained to within a small factor (not vacuous)."""
    from math import factorial

    from scipy.special import ndtr

    rng = np.random.default_rng(21)
    z = rng.uniform(-6, 6, 200_000)
    delta = rng.normal(0, 0.3, z.size)
    for order in (1, 3, 5):
        series, he_prev, he = np.zeros_like(z), np.zeros_like(z), np.ones_like(z)
        for k in range(1, order + 1):
            series += (-1.0) ** (k - 1) * he * delta**k / factorial(k)
            he_prev, he = he, z * he - (k - 1) * he_prev
        error = np.abs(ndtr(z + delta) - ndtr(z) - np.exp(-z * z / 2) / np.sqrt(2 * np.pi) * series)
        bound = cf.expansion_remainder(order) * delta ** (order + 1)
        assert (error <= bound + 1e-15).all(), order          # 1e-15: float64 rounding of Φ
        ratio = (error / bound)[bound > 1e-10]
        assert ratio.max() > 0.2, (order, ratio.max())
    with pytest.raises(ValueError, match="odd"):
        cf.expansion_remainder(4)


@pytest.mark.parametrize("spread", [0.002, 0.02, 0.3])
def test_expanded_positive_matches_mean_over_draws(spread):
    """P(τ > 0) by the expansion against the float64 mean of Φ over every draw: within the
    tolerance wherever the computed bound says so; tight draws take the expansion everywhere,
    wide ones nowhere (they fall back to the exact mean)."""
    from scipy.special import ndtr

    rng = np.random.default_rng(int(spread * 1000))
    configs, draws, leaves, tolerance = 7, 500, 5000, 1e-8
    scaled = rng.normal(0, 1, (configs, 3)) + rng.normal(0, spread, (draws, configs, 3)) * [1.0, 0.5, 2.0]
    scaled[:, 0, 0] = 0.0                       # a configuration with one arm: a_0 = 0
    reference = scaled.mean(0)
    terms = cf.expansion_terms()
    moments = np.mean([np.asarray(cf.deviation_powers(jnp.asarray(s - reference), terms)) for s in scaled], 0)
    config = rng.integers(0, configs, leaves).astype(np.int32)
    mean = rng.normal(0, 2, (leaves, 2))
    prob, within = cf.expanded_positive(jnp.asarray(reference), jnp.asarray(moments), jnp.asarray(config),
                                        jnp.asarray(mean), terms=terms, remainder=cf.expansion_remainder(),
                                        tolerance=tolerance)
    prob, within = np.asarray(prob), np.asarray(within)
    x = np.column_stack([mean, np.ones(leaves)])
    want = ndtr(np.einsum("dlj,lj->dl", scaled[:, config], x)).mean(0)
    assert np.abs(prob - want)[within].max(initial=0.0) <= tolerance
    assert within.all() if spread == 0.002 else True
    assert not within.any() if spread == 0.3 else True
    if spread == 0.02:
        assert 0 < within.sum() < leaves


@pytest.mark.parametrize("spread", [0.3, 0.003])
def test_leaves_route_summaries_match_tree_route(spread):
    """The per-configuration downward pass (``summarise_leaves``) against the generic one over
    the Gaussian tree (``summarise``), on the same hyperparameter draws: every group's
    Rao-Blackwellised mean, sd and P(τ > 0) are the same numbers; the ATE and the retained
    joint draws are random, so they are checked within Monte Carlo error. Wide draws take
    P(τ > 0) as the exact mean over draws, tight ones (a posterior from many groups) by the
    expansion, within its tolerance."""
    from functools import partial

    import engine
    from engine import api, validate
    from engine.encode import encode
    from engine.infer import downward, exact
    from engine.models import gaussian
    from engine.reduce import reduce
    from engine.spec import make_spec

    spec = make_spec("y", "treated", ["group"])
    rows = engine.simulate(rows=1500, groups=300, seed=5).rows
    cells = reduce(validate.check(validate.resolve_source(rows), spec), spec)
    problem, _ = api._model(cells, encode(cells), spec)
    configs, arms = gaussian.one_level_statistics(problem)
    rng = np.random.default_rng(0)
    total = 400
    flat = {}
    for name in gaussian.hyper_names(problem.std_priors):
        if "correlation" in name:
            flat[name] = rng.uniform(-0.5, 0.5, total) * spread / 0.3
        elif "scale" in name or "noise" in name:
            flat[name] = np.exp(rng.normal(np.log(0.6), spread, total))
        else:
            flat[name] = rng.normal(0.0, spread, total)
    levels, real = tuple(problem.levels), problem.real_nodes[0]
    weights = problem.leaf_rows / problem.leaf_rows.sum()
    tree = downward.summarise(
        partial(exact._one_draw, levels=levels, num_nodes=problem.num_nodes, covariates=()), flat,
        (jax.tree.map(jnp.asarray, problem.data), tuple(jnp.asarray(p) for p in problem.parents),
         jnp.asarray(weights)), rng_key=jax.random.PRNGKey(1), num_nodes=problem.num_nodes,
        real_nodes=problem.real_nodes, interval=0.9)
    leaves = downward.summarise_leaves(partial(exact._leaf_prior, levels=levels), flat, arms, weights,
                                       rng_key=jax.random.PRNGKey(2), real_nodes=real, interval=0.9, keep=100,
                                       expand=True)
    want, got = tree.link[0], leaves.link[0]
    for field in ("mean", "sd"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-9, atol=1e-12, err_msg=field)
    if spread == 0.3:
        # The expansion's bound fails for every group, which takes the exact mean, with Φ in
        # float32 (absolute error below 1e-7 per draw).
        assert leaves.exact_positive == real
        np.testing.assert_allclose(got.prob_positive, want.prob_positive, rtol=0, atol=2e-7)
        # Not trying the expansion (few groups) gives those numbers without the bound's pass.
        plain = downward.summarise_leaves(partial(exact._leaf_prior, levels=levels), flat, arms, weights,
                                          rng_key=jax.random.PRNGKey(2), real_nodes=real, interval=0.9,
                                          keep=100, expand=False)
        assert plain.exact_positive == -1
        np.testing.assert_array_equal(plain.link[0].prob_positive, got.prob_positive)
    else:
        assert leaves.exact_positive == 0
        tolerance = downward.EXPANSION_TOLERANCE + 1e-13       # + float64 rounding over 400 draws
        np.testing.assert_allclose(got.prob_positive, want.prob_positive, rtol=0, atol=tolerance)

    # Retained joint draws: every 4th of 400; each group's draw mean within 4.5 standard errors.
    assert got.draws.shape == (100, real) and got.draw_index.tolist() == list(range(0, total, 4))
    z = (got.draws.mean(0) - got.mean) / (got.sd / np.sqrt(100))
    assert np.abs(z).max() < 4.5
    # ATE: per draw both are exact draws from N(m_s, v_s) with the same m_s = Σ_g w_g E[τ_g | s]
    # and v_s, independently (the leaves route's from per-configuration sums, except at the
    # retained draws), so their difference has mean 0 and variance 2 v_s; and the mean of the
    # draws is Σ_g w_g E[τ_g] within (√v̄ / √draws) Monte Carlo error.
    d = leaves.ate - tree.ate
    noise_sd = d.std(ddof=1) / np.sqrt(2)
    assert abs(d.mean()) < 4.5 * d.std(ddof=1) / np.sqrt(total)
    assert abs(leaves.ate.mean() - weights[:real] @ got.mean) < 4.5 * noise_sd / np.sqrt(total)
    # Retained rows are joint: their ATE is their own weighted mean.
    np.testing.assert_allclose(leaves.ate[got.draw_index], got.draws @ weights[:real], rtol=1e-5, atol=1e-6)


def test_codes_number_each_distinct_pair_once():
    """Small pairs through the presence table, large ones by np.unique: one code per distinct pair."""
    from kernels.configurations import SMALL_PAIR, _codes

    rng = np.random.default_rng(8)
    a = np.concatenate([rng.integers(0, 30, 5_000), rng.integers(0, 5 * SMALL_PAIR, 300), [SMALL_PAIR, 0]])
    b = np.concatenate([rng.integers(0, 30, 5_000), rng.integers(0, 3, 300), [0, SMALL_PAIR]])
    index, first, size = _codes(a.astype(np.float64), b.astype(np.float64))
    pairs = np.stack([a, b], axis=1)
    assert size == np.unique(pairs, axis=0).shape[0]
    np.testing.assert_array_equal(pairs[first][index], pairs)      # every leaf's code names its own pair
    assert np.unique(index).size == size and index.min() == 0 and index.max() == size - 1
