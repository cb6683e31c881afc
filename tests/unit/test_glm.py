"""kernels/glm.py and the Laplace approximation of engine/models/glm.py, checked against
autodiff, a brute-force integral and finite differences."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from engine.models import glm  # noqa: E402
from kernels.glm import BinnedLeaves, Leaves, cell_terms, leaf_expansion  # noqa: E402


def tiny_problem(link, seed=0, leaves=3, size_scale=10.0):
    rng = np.random.default_rng(seed)
    leaf = np.repeat(np.arange(leaves), 2).astype(np.int32)
    arm = np.tile([0.0, 1.0], leaves)
    size = rng.integers(1, 20, leaf.shape[0]) * size_scale
    rate = 0.2 if link == "logit" else 0.5
    successes = rng.binomial(size.astype(int), rate).astype(float) if link == "logit" else \
        rng.poisson(size * rate).astype(float)
    return make_data(successes, size, arm, leaf, leaves)


def make_data(successes, size, arm, leaf, leaves):
    dense = [jnp.asarray(glm.per_leaf_arm(np.asarray(v), np.asarray(arm), np.asarray(leaf), leaves))
             for v in (successes, size)]
    return glm.GLMData(jnp.asarray(successes), jnp.asarray(size), jnp.asarray(arm), jnp.asarray(leaf),
                       jnp.zeros((leaves, 2)), *dense)


def leaf_log_lik(link, theta, data):
    eta = theta[data.leaf, 0] + data.arm * theta[data.leaf, 1]
    return cell_terms(link, eta, data.successes, data.size)[0].sum()


@pytest.mark.parametrize("link", ["logit", "log"])
def test_leaf_expansion_is_the_taylor_expansion(link):
    data = tiny_problem(link)
    theta = jnp.asarray(np.random.default_rng(1).normal(-1.0, 0.5, (3, 2)))
    w, h, c = leaf_expansion(link, theta, Leaves(data.leaf_successes, data.leaf_size))
    value = leaf_log_lik(link, theta, data)
    quad = c + jnp.sum(h * theta) - 0.5 * jnp.einsum("gi,gij,gj->", theta, w, theta)
    assert np.isclose(quad, value, rtol=1e-12, atol=1e-9)
    grad = jax.grad(leaf_log_lik, argnums=1)(link, theta, data)
    assert np.allclose(h - jnp.einsum("gij,gj->gi", w, theta), grad, atol=1e-9)
    hess = jax.hessian(lambda t: leaf_log_lik(link, t, data))(theta)  # (3,2,3,2)
    for g in range(3):
        assert np.allclose(-hess[g, :, g, :], w[g], atol=1e-9)


def nested_prior(scale_a=0.7, scale_t=0.4):
    cov = jnp.stack([jnp.diag(jnp.array([scale_a**2, scale_t**2]))] * 2)
    return cov, jnp.array([-1.0, 0.2])


def joint_log_density(link, nodes, data, parents, cov, mean):
    """log p(y | θ_leaf) + log p(θ | μ, Σ) for a two-level tree, nodes = (top (T,2), leaf (G,2))."""
    from jax.scipy.stats import multivariate_normal as mvn
    top, leaf = nodes
    prior = mvn.logpdf(top, mean, cov[0]).sum() + mvn.logpdf(leaf, top[parents[0]], cov[1]).sum()
    return leaf_log_lik(link, leaf, data) + prior


@pytest.mark.parametrize("link", ["logit", "log"])
def test_laplace_mode_is_stationary(link):
    data = tiny_problem(link)
    parents = (jnp.array([0, 0, 1], dtype=jnp.int32),)
    cov, mean = nested_prior()
    mode, steps = glm.laplace_mode(data, parents, cov, mean, link=link, num_nodes=(2, 3))
    assert 1 <= int(steps) < glm.NEWTON_MAX_STEPS
    from kernels import gaussian_tree as tree
    w, h, _ = leaf_expansion(link, mode, Leaves(data.leaf_successes, data.leaf_size))
    up = tree.integrate(w, h, parents, cov, mean, num_top=2)
    top = tree.posterior_means(up, parents, cov, mean)[0]
    grads = jax.grad(joint_log_density, argnums=1)(link, (top, mode), data, parents, cov, mean)
    assert max(float(jnp.abs(g).max()) for g in grads) < 1e-7


def brute_force_log_marginal(link, data, cov, mean, leaves, half_width=6.0, points=401):
    """One level: the leaves are independent given φ, so log p = Σ_g log ∫∫ L_g N(θ; μ, Σ) dθ,
    each on a grid around the leaf's mode."""
    from jax.scipy.stats import multivariate_normal as mvn
    total = 0.0
    for g in range(leaves):
        mask = np.asarray(data.leaf) == g
        sub = make_data(data.successes[mask], data.size[mask], data.arm[mask],
                        np.zeros(int(mask.sum()), np.int32), 1)
        mode, _ = glm.laplace_mode(sub, (), cov[:1], mean, link=link, num_nodes=(1,))
        w, _, _ = leaf_expansion(link, mode, Leaves(sub.leaf_successes, sub.leaf_size))
        sd = np.sqrt(np.diag(np.linalg.inv(np.asarray(w[0]) + np.linalg.inv(np.asarray(cov[0])))))
        a = np.linspace(-half_width, half_width, points) * sd[0] + float(mode[0, 0])
        t = np.linspace(-half_width, half_width, points) * sd[1] + float(mode[0, 1])
        grid = jnp.stack(jnp.meshgrid(jnp.asarray(a), jnp.asarray(t), indexing="ij"), -1).reshape(-1, 2)
        eta = grid[:, :1] + grid[:, 1:] * sub.arm[None, :]
        ll = cell_terms(link, eta, sub.successes[None, :], sub.size[None, :])[0].sum(-1)
        log_f = ll + mvn.logpdf(grid, mean, cov[0])
        top = log_f.max()
        total += float(top + jnp.log(jnp.exp(log_f - top).sum() * (a[1] - a[0]) * (t[1] - t[0])))
    return total


@pytest.mark.parametrize("link,size_scale,tolerance", [("log", 1000.0, 2e-3), ("logit", 10.0, 0.05)])
def test_laplace_marginal_against_brute_force(link, size_scale, tolerance):
    """Laplace is exact as the data swamp the prior curvature's change: with 10⁴ exposure per
    cell the Poisson error is O(1/n); with ~10² binomial trials it is still small."""
    data = tiny_problem(link, size_scale=size_scale)
    cov, mean = nested_prior()
    _, laplace, _ = glm.laplace_upward(data, (), cov[:1], mean, link=link, num_nodes=(3,))
    exact = brute_force_log_marginal(link, data, cov, mean, 3)
    assert abs(float(laplace) - exact) < tolerance, (float(laplace), exact)


@pytest.mark.parametrize("link", ["logit", "log"])
def test_laplace_gradient_matches_finite_differences(link):
    """The implicit-function gradient (one live Newton step at the mode) is the derivative of the
    Laplace marginal: compare with central differences in every hyperparameter direction."""
    data = tiny_problem(link)
    parents = (jnp.array([0, 0, 1], dtype=jnp.int32),)

    def log_marginal(phi):
        cov = jnp.stack([jnp.diag(jnp.exp(2 * phi[0:2])), jnp.diag(jnp.exp(2 * phi[2:4]))])
        return glm.laplace_upward(data, parents, cov, phi[4:6], link=link, num_nodes=(2, 3))[1]

    phi = jnp.array([np.log(0.7), np.log(0.4), np.log(0.5), np.log(0.3), -1.0, 0.2])
    grad = jax.grad(log_marginal)(phi)
    eps = 1e-5
    numeric = np.array([(log_marginal(phi + eps * e) - log_marginal(phi - eps * e)) / (2 * eps)
                        for e in np.eye(6)])
    assert np.allclose(grad, numeric, rtol=1e-5, atol=1e-6), (grad, numeric)


def sparse_leaves(leaves=50, seed=0):
    rng = np.random.default_rng(seed)
    size = rng.integers(0, 4, (leaves, 2)).astype(float)
    size[:, 0] = np.maximum(size[:, 0], 1)
    return rng.binomial(size.astype(int), 0.1).astype(float), size


def independent_modes(successes, size, cov, mean, steps=40):
    from kernels.glm import independent_newton_step
    theta = jnp.zeros(successes.shape) + mean
    for _ in range(steps):
        theta = independent_newton_step("logit", theta, Leaves(jnp.asarray(successes), jnp.asarray(size)), cov, mean)
    return theta


def test_gauss_hermite_converges_to_the_integral_of_sparse_leaves():
    """Leaves of 1–3 Bernoulli rows: the integrand is far from Gaussian, so Laplace (1 node) is off
    and adaptive Gauss–Hermite with enough nodes reaches a brute-force grid integral."""
    from jax.scipy.stats import multivariate_normal as mvn
    from kernels.glm import independent_log_marginal
    successes, size = sparse_leaves()
    cov, mean = jnp.array([[1.3**2, 0.0], [0.0, 0.4**2]]), jnp.array([-2.8, 0.5])
    mode = independent_modes(successes, size, cov, mean)
    a, t = np.linspace(-12, 6, 1201), np.linspace(-4, 5, 901)
    grid = jnp.stack([g.ravel() for g in np.meshgrid(a, t, indexing="ij")], -1)
    log_prior = mvn.logpdf(grid, mean, cov)
    brute = 0.0
    for g in range(successes.shape[0]):
        f = (cell_terms("logit", grid[:, 0], successes[g, 0], size[g, 0])[0]
             + cell_terms("logit", grid[:, 0] + grid[:, 1], successes[g, 1], size[g, 1])[0] + log_prior)
        brute += float(f.max() + jnp.log(jnp.exp(f - f.max()).sum() * (a[1] - a[0]) * (t[1] - t[0])))
    error = {k: abs(float(independent_log_marginal("logit", mode, Leaves(jnp.asarray(successes), jnp.asarray(size)),
                                                   cov, mean, k).sum()) - brute) for k in (1, 7, 9)}
    assert error[9] < 1e-3 and error[7] < 0.01 < error[1], error


def test_quadrature_table_groups_identical_leaves_exactly():
    from kernels.glm import independent_log_marginal
    successes, size = sparse_leaves(leaves=200, seed=3)
    init = np.zeros_like(size)
    table = glm.quadrature_table("logit", successes, size, init, 1)
    assert table["quad_count"].sum() == 200 and table["large_size"].sum() == 0
    assert (table["quad_count"] > 0).sum() < 40      # 200 sparse leaves, few distinct configurations
    cov, mean = jnp.array([[1.0, 0.3], [0.3, 0.5]]), jnp.array([-2.0, 0.2])
    per_leaf = independent_log_marginal("logit", independent_modes(successes, size, cov, mean),
                                        Leaves(jnp.asarray(successes), jnp.asarray(size)), cov, mean, 7).sum()
    config_modes = independent_modes(table["quad_successes"], table["quad_size"], cov, mean)
    grouped = (independent_log_marginal("logit", config_modes, Leaves(jnp.asarray(table["quad_successes"]),
                                                                      jnp.asarray(table["quad_size"])), cov, mean, 7)
               * table["quad_count"]).sum()
    assert np.isclose(per_leaf, grouped, rtol=1e-12, atol=1e-9)
    # A nested tree keeps no table; a large leaf stays out of it.
    assert glm.quadrature_table("logit", successes, size, init, 2)["quad_count"].shape == (0,)
    big = glm.quadrature_table("logit", np.array([[5.0, 9.0]]), np.array([[100.0, 120.0]]), np.zeros((1, 2)), 1)
    assert big["quad_count"].sum() == 0 and big["large_size"][0].tolist() == [100.0, 120.0]


def split_cells(successes, size, rng):
    """Each (leaf, arm) total cut into 1–3 cells (a GLM's covariate bins), as ``BinnedLeaves``."""
    rows = []
    for g in range(successes.shape[0]):
        for t in (0, 1):
            parts = rng.integers(1, 4)
            size_parts = np.diff(np.sort(np.concatenate([[0, size[g, t]], rng.uniform(0, size[g, t], parts - 1)])))
            share = size_parts / max(size[g, t], 1e-12)
            for m, w in zip(size_parts, share):
                rows.append((successes[g, t] * w, m, float(t), g))
    s, m, arm, leaf = (np.array(c) for c in zip(*rows))
    return s, m, arm, leaf.astype(np.int32)


@pytest.mark.parametrize("link", ["logit", "log"])
def test_binned_leaves_with_zero_offsets_equal_the_dense_leaves(link):
    """Cells keyed by covariate bin: with every offset 0 the per-leaf sums are the dense leaf
    totals, so the Newton step, the expansion and the quadrature marginal must agree exactly."""
    from kernels.glm import independent_log_marginal, independent_newton_step, leaf_terms
    rng = np.random.default_rng(5)
    successes, size = sparse_leaves(leaves=30, seed=5)
    s, m, arm, leaf = split_cells(successes, size, rng)
    dense = Leaves(jnp.asarray(successes), jnp.asarray(size))
    binned = BinnedLeaves(jnp.asarray(s), jnp.asarray(m), jnp.asarray(arm), jnp.asarray(leaf), jnp.zeros(s.shape[0]))
    theta = jnp.asarray(rng.normal(-1.5, 0.5, (30, 2)))
    cov, mean = jnp.array([[1.0, 0.3], [0.3, 0.5]]), jnp.array([-2.0, 0.2])
    for a, b in zip(leaf_terms(link, theta, dense), leaf_terms(link, theta, binned)):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert np.allclose(independent_newton_step(link, theta, dense, cov, mean),
                       independent_newton_step(link, theta, binned, cov, mean), rtol=1e-12)
    assert np.allclose(independent_log_marginal(link, theta, dense, cov, mean, 7),
                       independent_log_marginal(link, theta, binned, cov, mean, 7), rtol=1e-12)


def test_binned_offsets_are_the_cells_linear_predictor():
    """A cell's offset enters η exactly: the expansion's value at θ is Σ ℓ(α + τt + o)."""
    rng = np.random.default_rng(7)
    successes, size = sparse_leaves(leaves=20, seed=7)
    s, m, arm, leaf = split_cells(successes, size, rng)
    offset = rng.normal(0, 0.7, s.shape[0])
    obs = BinnedLeaves(jnp.asarray(s), jnp.asarray(m), jnp.asarray(arm), jnp.asarray(leaf), jnp.asarray(offset))
    theta = jnp.asarray(rng.normal(-1.0, 0.5, (20, 2)))
    w, h, c = leaf_expansion("logit", theta, obs)
    direct = cell_terms("logit", theta[leaf, 0] + theta[leaf, 1] * arm + offset, s, m)[0].sum()
    quad = c + jnp.sum(h * theta) - 0.5 * jnp.einsum("gi,gij,gj->", theta, w, theta)
    assert np.isclose(quad, direct, rtol=1e-12, atol=1e-9)


def test_laplace_gradient_in_the_slope_matches_finite_differences():
    """With covariates the offsets depend on the slope: the implicit gradient covers it too
    (one level, large leaves by Laplace and small ones by quadrature)."""
    rng = np.random.default_rng(11)
    leaves = 12
    leaf = np.repeat(np.arange(leaves), 6).astype(np.int32)
    arm = np.tile([0.0, 0.0, 0.0, 1.0, 1.0, 1.0], leaves)
    size = rng.integers(1, 30, leaf.shape[0]).astype(float)
    size[leaf < 4] = 1.0                            # small leaves: quadrature
    x = rng.normal(0, 1, (leaf.shape[0], 1))
    successes = rng.binomial(size.astype(int), 1 / (1 + np.exp(1.5 - 0.6 * x[:, 0]))).astype(float)
    init = np.zeros((leaves, 2))
    measure = glm.per_leaf_arm(size, arm, leaf, leaves)
    sets = glm.binned_sets("logit", successes, size, arm, leaf, x, init, measure, 1)
    data = make_data(successes, size, arm, leaf, leaves)._replace(x=jnp.asarray(x), **sets)
    assert glm.small_leaves(data) == 4

    def log_marginal(phi):
        cov = jnp.diag(jnp.exp(2 * phi[0:2]))[None]
        return glm.log_marginal(data, (), cov, phi[2:4], link="logit", num_nodes=(leaves,), slope=phi[4:5])

    phi = jnp.array([np.log(0.7), np.log(0.4), -1.5, 0.2, 0.5])
    grad = jax.grad(log_marginal)(phi)
    eps = 1e-5
    numeric = np.array([(log_marginal(phi + eps * e) - log_marginal(phi - eps * e)) / (2 * eps)
                        for e in np.eye(5)])
    assert np.allclose(grad, numeric, rtol=1e-5, atol=1e-6), (grad, numeric)
