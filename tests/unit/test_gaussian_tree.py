"""kernels.gaussian_tree against a dense NumPy float64 reference (MATH.md).

The reference stacks every node's θ into one vector: node = parent + an
independent N(0, Σ_ℓ) increment, so the prior is N(1⊗μ, M D Mᵀ) with M the
ancestor-or-self matrix and D the block-diagonal increment covariance. The
tree kernels must reproduce that dense Gaussian's integrals and moments.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import gaussian_tree as gt

SIZES = (2, 5, 12)  # top, middle, leaves


# --- random trees and data ---------------------------------------------------


def random_parents(rng, num_parents, num_children):
    """Parent index per child, every parent with at least one child."""
    links = np.concatenate(
        [np.arange(num_parents), rng.integers(0, num_parents, num_children - num_parents)]
    )
    return rng.permutation(links).astype(np.int32)


def random_tree(rng, sizes):
    return tuple(random_parents(rng, sizes[k], sizes[k + 1]) for k in range(len(sizes) - 1))


def random_cov(rng):
    sd = rng.uniform(0.4, 1.5, size=2)
    rho = rng.uniform(-0.8, 0.8)
    return np.array([[sd[0] ** 2, rho * sd[0] * sd[1]], [rho * sd[0] * sd[1], sd[1] ** 2]])


def random_prior(rng, num_levels):
    return np.stack([random_cov(rng) for _ in range(num_levels)]), rng.normal(size=2)


def random_leaf_information(rng, num_leaves):
    """Leaves cycling through full-rank J, rank-1 J (arm 0 or arm 1 only) and J = 0.

    h = J u lies in the range of J, as data-derived potentials do.
    """
    kinds = rng.permutation(np.arange(num_leaves) % 4)
    precision = np.zeros((num_leaves, 2, 2))
    for g, kind in enumerate(kinds):
        if kind == 0:
            b = rng.normal(size=(2, 2))
            precision[g] = 2.0 * b @ b.T + 0.2 * np.eye(2)
        elif kind in (1, 2):
            x = np.array([1.0, kind - 1.0])
            precision[g] = rng.uniform(0.5, 5.0) * np.outer(x, x)
    potential = np.einsum("gij,gj->gi", precision, rng.normal(size=(num_leaves, 2)))
    assert set(kinds) == {0, 1, 2, 3}
    return precision, potential


# --- dense reference -----------------------------------------------------------


def dense_prior(sizes, parents, prior_cov, prior_mean):
    """Joint prior mean (2N,) and covariance (2N, 2N) of all nodes, top level first."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    num_nodes = offsets[-1]
    ancestor = np.eye(num_nodes)  # ancestor[v, u] = 1 if u is v or an ancestor of v
    increment_cov = np.zeros((2 * num_nodes, 2 * num_nodes))
    for level, size in enumerate(sizes):
        for i in range(size):
            v = offsets[level] + i
            if level > 0:
                ancestor[v] += ancestor[offsets[level - 1] + parents[level - 1][i]]
            increment_cov[2 * v : 2 * v + 2, 2 * v : 2 * v + 2] = prior_cov[level]
    m = np.kron(ancestor, np.eye(2))
    return np.tile(prior_mean, num_nodes), m @ increment_cov @ m.T


def dense_data(sizes, leaf_precision, leaf_potential):
    first_leaf = sum(sizes[:-1])
    dim = 2 * sum(sizes)
    precision = np.zeros((dim, dim))
    potential = np.zeros(dim)
    for g in range(sizes[-1]):
        s = slice(2 * (first_leaf + g), 2 * (first_leaf + g) + 2)
        precision[s, s] = leaf_precision[g]
        potential[s] = leaf_potential[g]
    return precision, potential


def dense_log_normaliser(mean, cov, precision, potential):
    """log E_{θ~N(mean, cov)} exp(-½θᵀJθ + hᵀθ), without inverting cov."""
    dim = mean.size
    b = potential - precision @ mean
    inflate = np.eye(dim) + cov @ precision  # |I + S J| > 0
    sign, log_det = np.linalg.slogdet(inflate)
    assert sign > 0
    post_cov = np.linalg.solve(inflate, cov)
    quadratic = -0.5 * mean @ precision @ mean + potential @ mean + 0.5 * b @ post_cov @ b
    return quadratic - 0.5 * log_det


def dense_posterior(mean, cov, precision, potential):
    post_cov = np.linalg.solve(np.eye(mean.size) + cov @ precision, cov)
    post_cov = 0.5 * (post_cov + post_cov.T)
    return mean + post_cov @ (potential - precision @ mean), post_cov


def stack_levels(per_level):
    """Per-level (..., nodes, 2) arrays -> (..., 2N) in the dense ordering."""
    return np.concatenate(
        [np.asarray(x).reshape(np.shape(x)[:-2] + (-1,)) for x in per_level], axis=-1
    )


def as_jax(*arrays):
    return tuple(jnp.asarray(a) for a in arrays)


def random_problem(seed, sizes=SIZES):
    rng = np.random.default_rng(seed)
    parents = random_tree(rng, sizes)
    prior_cov, prior_mean = random_prior(rng, len(sizes))
    leaf_precision, leaf_potential = random_leaf_information(rng, sizes[-1])
    return parents, prior_cov, prior_mean, leaf_precision, leaf_potential


# Compiled once per shape: eager op-by-op dispatch would compile every small op.
integrate_jit = jax.jit(gt.integrate, static_argnames="num_top")
log_marginal_jit = jax.jit(gt.gaussian_log_marginal, static_argnames=("num_leaves", "num_top"))


def run_integrate(parents, prior_cov, prior_mean, leaf_precision, leaf_potential):
    sizes = (int(np.max(parents[0])) + 1,) if parents else ()
    return integrate_jit(
        *as_jax(leaf_precision, leaf_potential),
        tuple(jnp.asarray(p) for p in parents),
        *as_jax(prior_cov, prior_mean),
        num_top=sizes[0] if sizes else None,
    )


# --- Gaussian cells from raw rows -----------------------------------------------


def simulate_rows(rng, sizes, parents, prior_cov, prior_mean):
    """Raw rows (leaf, arm, y, cell) with leaves having both arms, one arm or none."""
    mean, cov = dense_prior(sizes, parents, prior_cov, prior_mean)
    theta = rng.multivariate_normal(mean, cov).reshape(-1, 2)[sum(sizes[:-1]) :]
    kinds = rng.permutation(np.arange(sizes[-1]) % 4)
    arms_of_kind = {0: (0, 1), 1: (0,), 2: (1,), 3: ()}
    cells, rows = [], []
    for g, kind in enumerate(kinds):
        for t in arms_of_kind[kind]:
            sigma2 = rng.uniform(0.5, 2.0)
            count = int(rng.integers(1, 5))
            y = theta[g, 0] + t * theta[g, 1] + np.sqrt(sigma2) * rng.normal(size=count)
            cells.append((g, t, sigma2, y))
            rows.extend((g, t, sigma2, v) for v in y)
    return cells, np.array(rows)


def cell_statistics(cells, padding):
    """(n, mean, m2, arm, leaf, noise_var) arrays; `padding` rows appended with n = 0."""
    stats = [(y.size, y.mean(), np.sum((y - y.mean()) ** 2), t, g, s2) for g, t, s2, y in cells]
    stats += [(0, pm, pm2, 1, 0, ps2) for pm, pm2, ps2 in padding]
    n, mean, m2, arm, leaf, noise_var = map(np.array, zip(*stats))
    return (
        n.astype(np.float64), mean, m2, arm.astype(np.int32), leaf.astype(np.int32), noise_var
    )


def dense_row_log_density(rows, sizes, parents, prior_cov, prior_mean):
    """log N(y | X m, X S Xᵀ + diag σ²) over raw rows."""
    mean, cov = dense_prior(sizes, parents, prior_cov, prior_mean)
    first_leaf = sum(sizes[:-1])
    design = np.zeros((len(rows), mean.size))
    for i, (g, t, _, _) in enumerate(rows):
        design[i, 2 * (first_leaf + int(g))] = 1.0
        design[i, 2 * (first_leaf + int(g)) + 1] = t
    y_cov = design @ cov @ design.T + np.diag(rows[:, 2])
    resid = rows[:, 3] - design @ mean
    _, log_det = np.linalg.slogdet(2 * np.pi * y_cov)
    return -0.5 * (resid @ np.linalg.solve(y_cov, resid) + log_det)


# --- tests: integration ------------------------------------------------------------


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_log_normaliser_matches_dense_gaussian_integral(seed):
    parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(seed)
    upward = run_integrate(parents, prior_cov, prior_mean, leaf_precision, leaf_potential)
    mean, cov = dense_prior(SIZES, parents, prior_cov, prior_mean)
    expected = dense_log_normaliser(mean, cov, *dense_data(SIZES, leaf_precision, leaf_potential))
    np.testing.assert_allclose(float(upward.log_normaliser), expected, rtol=1e-10)
    assert [a.shape for a in upward.precision] == [(s, 2, 2) for s in SIZES]
    assert [h.shape for h in upward.potential] == [(s, 2) for s in SIZES]


def test_log_normaliser_single_level_and_four_levels():
    for seed, sizes in [(21, (6,)), (22, (1, 3, 4, 9))]:
        parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(seed, sizes)
        upward = run_integrate(parents, prior_cov, prior_mean, leaf_precision, leaf_potential)
        mean, cov = dense_prior(sizes, parents, prior_cov, prior_mean)
        expected = dense_log_normaliser(
            mean, cov, *dense_data(sizes, leaf_precision, leaf_potential)
        )
        np.testing.assert_allclose(float(upward.log_normaliser), expected, rtol=1e-10)


def test_parents_must_match_levels():
    parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(31)
    with pytest.raises(ValueError, match="len\\(parents\\)"):
        run_integrate(parents[1:], prior_cov, prior_mean, leaf_precision, leaf_potential)


def test_traced_parents_need_num_top():
    parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(32)
    args = as_jax(leaf_precision, leaf_potential, prior_cov, prior_mean)

    def log_normaliser(j, h, s, mu, links, **kw):
        return gt.integrate(j, h, links, s, mu, **kw).log_normaliser

    links = tuple(jnp.asarray(p) for p in parents)
    with pytest.raises(ValueError, match="num_top"):
        jax.jit(log_normaliser)(*args, links)
    traced = jax.jit(lambda *a: log_normaliser(*a, num_top=SIZES[0]))(*args, links)
    # Closed-over NumPy parents stay concrete under jit, so num_top is inferred.
    inferred = jax.jit(lambda *a: log_normaliser(*a, parents))(*args)
    np.testing.assert_allclose(float(traced), float(inferred), rtol=1e-13)


# --- tests: Gaussian outcome --------------------------------------------------------


def test_leaf_information_matches_loop():
    rng = np.random.default_rng(41)
    cells, _ = simulate_rows(rng, SIZES, random_tree(rng, SIZES), *random_prior(rng, 3))
    n, mean, m2, arm, leaf, noise_var = cell_statistics(cells, padding=[(2.5, 1.0, 0.7)])
    precision, potential = gt.gaussian_leaf_information(
        *as_jax(n, mean, arm, leaf), SIZES[-1], jnp.asarray(noise_var)
    )
    expected_j = np.zeros((SIZES[-1], 2, 2))
    expected_h = np.zeros((SIZES[-1], 2))
    for c in range(n.size):
        x = np.array([1.0, arm[c]])
        expected_j[leaf[c]] += n[c] / noise_var[c] * np.outer(x, x)
        expected_h[leaf[c]] += n[c] * mean[c] / noise_var[c] * x
    np.testing.assert_allclose(np.asarray(precision), expected_j, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(potential), expected_h, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("seed", [51, 52])
def test_gaussian_log_marginal_matches_dense_rows(seed):
    rng = np.random.default_rng(seed)
    parents = random_tree(rng, SIZES)
    prior_cov, prior_mean = random_prior(rng, 3)
    cells, rows = simulate_rows(rng, SIZES, parents, prior_cov, prior_mean)
    expected = dense_row_log_density(rows, SIZES, parents, prior_cov, prior_mean)
    # Padding with finite junk and with NaN / zero variance must both vanish.
    for padding in ([(3.7, 2.0, 0.9)], [(np.nan, np.nan, 0.0), (1.5, 0.3, 0.0)]):
        n, mean, m2, arm, leaf, noise_var = cell_statistics(cells, padding)
        value, upward = log_marginal_jit(
            *as_jax(n, mean, m2, arm, leaf),
            tuple(jnp.asarray(p) for p in parents),
            *as_jax(prior_cov, prior_mean, noise_var),
            num_leaves=SIZES[-1],
            num_top=SIZES[0],
        )
        np.testing.assert_allclose(float(value), expected, rtol=1e-10)
        assert upward.precision[-1].shape == (SIZES[-1], 2, 2)


def test_gaussian_log_marginal_single_level_scalar_noise():
    rng = np.random.default_rng(61)
    sizes = (7,)
    prior_cov, prior_mean = random_prior(rng, 1)
    cells, rows = simulate_rows(rng, sizes, (), prior_cov, prior_mean)
    sigma2 = 1.3
    rows[:, 2] = sigma2
    n, mean, m2, arm, leaf, _ = cell_statistics(cells, padding=[(0.4, 0.1, 1.0)])
    value, _ = log_marginal_jit(
        *as_jax(n, mean, m2, arm, leaf), (), *as_jax(prior_cov, prior_mean), sigma2, num_leaves=7
    )
    expected = dense_row_log_density(rows, sizes, (), prior_cov, prior_mean)
    np.testing.assert_allclose(float(value), expected, rtol=1e-10)


# --- tests: downward pass -------------------------------------------------------


def _posterior_setup(seed):
    parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(seed)
    upward = run_integrate(parents, prior_cov, prior_mean, leaf_precision, leaf_potential)
    mean, cov = dense_prior(SIZES, parents, prior_cov, prior_mean)
    post_mean, post_cov = dense_posterior(
        mean, cov, *dense_data(SIZES, leaf_precision, leaf_potential)
    )
    links = tuple(jnp.asarray(p) for p in parents)
    return upward, links, as_jax(prior_cov, prior_mean), post_mean, post_cov


@pytest.mark.parametrize("seed", [71, 72])
def test_posterior_moments_match_dense(seed):
    upward, links, prior, post_mean, post_cov = _posterior_setup(seed)
    means, covariances = jax.jit(gt.posterior_moments)(upward, links, *prior)
    np.testing.assert_allclose(stack_levels(means), post_mean, rtol=1e-10, atol=1e-12)
    offset = 0
    for level_cov in covariances:
        for c in np.asarray(level_cov):
            np.testing.assert_allclose(
                c, post_cov[offset : offset + 2, offset : offset + 2], rtol=1e-10, atol=1e-12
            )
            offset += 2
    assert offset == post_mean.size


def test_conditional_mean_matches_dense_gaussian_conditioning():
    """E[θ_v | θ_parent] from the dense posterior: m_v + C_vp C_pp⁻¹ (θ_p − m_p)."""
    upward, links, prior, post_mean, post_cov = _posterior_setup(81)
    rng = np.random.default_rng(81)
    draws = tuple(jnp.asarray(rng.normal(size=(s, 2))) for s in SIZES)
    got = stack_levels(jax.jit(gt.conditional_mean)(draws, upward, links, *prior))
    flat = stack_levels(draws)
    offsets = np.concatenate([[0], np.cumsum(SIZES)])
    for level, size in enumerate(SIZES):
        for i in range(size):
            v = slice(2 * (offsets[level] + i), 2 * (offsets[level] + i) + 2)
            if level == 0:  # parent is the constant μ: the posterior mean itself
                expected = post_mean[v]
            else:
                p0 = 2 * (offsets[level - 1] + int(links[level - 1][i]))
                p = slice(p0, p0 + 2)
                gain = post_cov[v, p] @ np.linalg.inv(post_cov[p, p])
                expected = post_mean[v] + gain @ (flat[p] - post_mean[p])
            np.testing.assert_allclose(got[v], expected, rtol=1e-9, atol=1e-11)


def test_sample_matches_dense_posterior_within_monte_carlo_error():
    upward, links, prior, post_mean, post_cov = _posterior_setup(91)
    num_draws = 4000
    keys = jax.random.split(jax.random.key(91), num_draws)

    def draw(key):
        draws = gt.sample(key, upward, links, *prior)
        return draws, gt.conditional_mean(draws, upward, links, *prior)

    draws, cond = jax.jit(jax.vmap(draw))(keys)
    draws, cond = stack_levels(draws), stack_levels(cond)  # (draws, 2N)
    assert np.all(np.isfinite(draws))

    var = np.diag(post_cov)
    z = (draws.mean(0) - post_mean) / np.sqrt(var / num_draws)
    assert np.max(np.abs(z)) < 4, z

    # Joint, not just marginal: every pair of coordinates, parents with children
    # included. Var of a Gaussian product x_i x_j is C_ii C_jj + C_ij².
    empirical_cov = np.cov(draws, rowvar=False)
    cov_se = np.sqrt((np.outer(var, var) + post_cov**2) / num_draws)
    assert np.max(np.abs(empirical_cov - post_cov) / cov_se) < 5

    # Rao-Blackwellised means: same target, smaller spread (law of total variance);
    # top-level conditional means are exact (their parent is the constant μ).
    top = 2 * SIZES[0]
    np.testing.assert_allclose(cond[:, :top], np.tile(post_mean[:top], (num_draws, 1)), rtol=1e-10)
    cond_se = np.sqrt(cond[:, top:].var(0) / num_draws)
    cond_z = (cond[:, top:].mean(0) - post_mean[top:]) / cond_se
    assert np.max(np.abs(cond_z)) < 4, cond_z
    assert np.all(cond.var(0) < draws.var(0))


# --- tests: compilation, gradients, dtypes ------------------------------------------


def _marginal_inputs(seed):
    rng = np.random.default_rng(seed)
    parents = random_tree(rng, SIZES)
    prior_cov, prior_mean = random_prior(rng, 3)
    cells, _ = simulate_rows(rng, SIZES, parents, prior_cov, prior_mean)
    stats = cell_statistics(cells, padding=[(np.nan, np.nan, 0.0)])
    return stats, tuple(jnp.asarray(p) for p in parents), prior_cov, prior_mean


def test_jit_value_and_grad_matches_finite_differences():
    (n, mean, m2, arm, leaf, noise_var), links, prior_cov, prior_mean = _marginal_inputs(101)

    def log_marginal(cov, mu, var):
        return gt.gaussian_log_marginal(
            *as_jax(n, mean, m2, arm, leaf), links, cov, mu, var,
            num_leaves=SIZES[-1], num_top=SIZES[0],
        )[0]

    value_and_grad = jax.jit(jax.value_and_grad(log_marginal, argnums=(0, 1, 2)))
    value_fn = lambda *a: value_and_grad(*a)[0]  # noqa: E731  (no second compile)
    args = as_jax(prior_cov, prior_mean, noise_var)
    value, grads = value_and_grad(*args)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert float(grads[2][-1]) == 0.0  # padding cell's variance does not matter

    eps = 1e-6
    for which, arg in enumerate(args[:2]):
        for index in np.ndindex(arg.shape):
            step = jnp.zeros_like(arg).at[index].set(eps)
            shifted = [list(args), list(args)]
            shifted[0][which] = arg + step
            shifted[1][which] = arg - step
            fd = (float(value_fn(*shifted[0])) - float(value_fn(*shifted[1]))) / (2 * eps)
            np.testing.assert_allclose(float(grads[which][index]), fd, rtol=1e-6, atol=1e-7)


def test_grad_wrt_leaf_information_matches_finite_differences():
    parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(111)
    links = tuple(jnp.asarray(p) for p in parents)

    def log_normaliser(j, h):
        prior = as_jax(prior_cov, prior_mean)
        return gt.integrate(j, h, links, *prior, num_top=SIZES[0]).log_normaliser

    j, h = as_jax(leaf_precision, leaf_potential)
    value_and_grad = jax.jit(jax.value_and_grad(log_normaliser, argnums=(0, 1)))
    _, grads = value_and_grad(j, h)
    value_fn = lambda *a: value_and_grad(*a)[0]  # noqa: E731  (no second compile)
    rng = np.random.default_rng(111)
    eps = 1e-6
    for _ in range(3):
        dj = rng.normal(size=j.shape)
        dj = jnp.asarray(dj + np.swapaxes(dj, -1, -2))
        dh = jnp.asarray(rng.normal(size=h.shape))
        up = float(value_fn(j + eps * dj, h + eps * dh))
        down = float(value_fn(j - eps * dj, h - eps * dh))
        fd = (up - down) / (2 * eps)
        ad = float(jnp.sum(grads[0] * dj) + jnp.sum(grads[1] * dh))
        np.testing.assert_allclose(ad, fd, rtol=1e-6, atol=1e-7)


def test_jitted_log_marginal_traces_once():
    traces = []

    def log_marginal(n, mean, m2, arm, leaf, links, cov, mu, var):
        traces.append(1)
        return gt.gaussian_log_marginal(
            n, mean, m2, arm, leaf, links, cov, mu, var, num_leaves=SIZES[-1], num_top=SIZES[0]
        )[0]

    compiled = jax.jit(log_marginal)
    values = []
    for seed in (121, 122):  # same shapes, new tree, data and hyperparameters
        rng = np.random.default_rng(seed)
        parents = random_tree(rng, SIZES)
        prior_cov, prior_mean = random_prior(rng, 3)
        cells = [
            (g, t, rng.uniform(0.5, 2.0), rng.normal(size=3))
            for g in range(SIZES[-1])
            for t in (0, 1)
        ]
        n, mean, m2, arm, leaf, noise_var = cell_statistics(cells, padding=[(1.0, 1.0, 1.0)])
        links = tuple(jnp.asarray(p) for p in parents)
        args = (*as_jax(n, mean, m2, arm, leaf), links, *as_jax(prior_cov, prior_mean, noise_var))
        values.append(float(compiled(*args)))
        rows = np.array([(g, t, s2, v) for g, t, s2, y in cells for v in y])
        expected = dense_row_log_density(rows, SIZES, parents, prior_cov, prior_mean)
        np.testing.assert_allclose(values[-1], expected, rtol=1e-10)
    assert values[0] != values[1]
    assert len(traces) == 1


def test_float32_inputs_stay_float32():
    (n, mean, m2, arm, leaf, noise_var), links, prior_cov, prior_mean = _marginal_inputs(131)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731

    @jax.jit
    def everything(n, mean, m2, var, cov, mu):
        value, upward = gt.gaussian_log_marginal(
            n, mean, m2, jnp.asarray(arm), jnp.asarray(leaf), links, cov, mu, var,
            num_leaves=SIZES[-1], num_top=SIZES[0],
        )
        draws = gt.sample(jax.random.key(0), upward, links, cov, mu)
        cond = gt.conditional_mean(draws, upward, links, cov, mu)
        means, covs = gt.posterior_moments(upward, links, cov, mu)
        return [value, *upward.precision, *upward.potential, *draws, *cond, *means, *covs]

    outputs = everything(*map(f32, (n, mean, m2, noise_var, prior_cov, prior_mean)))
    value = outputs[0]
    assert {x.dtype for x in outputs} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(value))


# --- tests: chunked passes, cell layouts, derivatives of every input --------------------


def blocked_statistics(rng, cells, num_leaves, cells_per_leaf=2):
    """Cells stored leaf by leaf, `cells_per_leaf` each: short leaves padded with junk n = 0
    cells (NaN mean and M2, zero variance), arms shuffled within each leaf."""
    by_leaf = {g: [] for g in range(num_leaves)}
    for g, t, s2, y in cells:
        by_leaf[g].append((y.size, y.mean(), np.sum((y - y.mean()) ** 2), t, g, s2))
    stats = []
    for g in range(num_leaves):
        block = by_leaf[g] + [(0, np.nan, np.nan, 1, g, 0.0)] * (cells_per_leaf - len(by_leaf[g]))
        stats += [block[i] for i in rng.permutation(cells_per_leaf)]
    n, mean, m2, arm, leaf, noise_var = map(np.array, zip(*stats))
    return (
        n.astype(np.float64), mean, m2, arm.astype(np.int32), leaf.astype(np.int32), noise_var
    )


def _log_marginal_fn(links, num_top=SIZES[0], **kw):
    """(n, mean, m2, arm, leaf, cov, mu, var) -> log marginal, for jit and grad."""

    def log_marginal(n, mean, m2, arm, leaf, cov, mu, var):
        return gt.gaussian_log_marginal(
            n, mean, m2, arm, leaf, links, cov, mu, var,
            num_leaves=SIZES[-1], num_top=num_top, **kw,
        )[0]

    return log_marginal


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_chunked_upward_pass_matches_dense_and_unchunked(chunk_size):
    """Folding levels in chunks (with a shorter remainder) changes nothing but rounding."""
    parents, prior_cov, prior_mean, leaf_precision, leaf_potential = random_problem(141)
    links = tuple(jnp.asarray(p) for p in parents)

    def run(j, h, cov, mu, **kw):
        return gt.integrate(j, h, links, cov, mu, num_top=SIZES[0], **kw)

    args = as_jax(leaf_precision, leaf_potential, prior_cov, prior_mean)
    chunked = jax.jit(lambda *a: run(*a, chunk_size=chunk_size))(*args)
    whole = jax.jit(run)(*args)
    mean, cov = dense_prior(SIZES, parents, prior_cov, prior_mean)
    expected = dense_log_normaliser(mean, cov, *dense_data(SIZES, leaf_precision, leaf_potential))
    np.testing.assert_allclose(float(chunked.log_normaliser), expected, rtol=1e-10)
    for got, want in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)

    def grads(**kw):
        value = lambda *a: run(*a, **kw).log_normaliser  # noqa: E731
        return jax.jit(jax.grad(value, argnums=(0, 1, 2, 3)))(*args)

    for got, want in zip(grads(chunk_size=chunk_size), grads()):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12)


def test_blocked_cells_match_dense_rows_and_scattered_cells():
    """cells_per_leaf: the same value and gradients as cells in any order, padding included."""
    rng = np.random.default_rng(151)
    parents = random_tree(rng, SIZES)
    prior_cov, prior_mean = random_prior(rng, 3)
    cells, rows = simulate_rows(rng, SIZES, parents, prior_cov, prior_mean)
    expected = dense_row_log_density(rows, SIZES, parents, prior_cov, prior_mean)
    links = tuple(jnp.asarray(p) for p in parents)
    blocked = as_jax(*blocked_statistics(rng, cells, SIZES[-1], cells_per_leaf=3))
    scattered = as_jax(*cell_statistics(cells, padding=[(np.nan, np.nan, 0.0)]))
    prior = as_jax(prior_cov, prior_mean)
    value = jax.jit(_log_marginal_fn(links, cells_per_leaf=3))(*blocked[:5], *prior, blocked[5])
    np.testing.assert_allclose(float(value), expected, rtol=1e-10)
    # Shared noise variance (the fast path), against cells in any order.
    sigma2 = jnp.asarray(1.3)
    want_value, want_grads = jax.jit(
        jax.value_and_grad(_log_marginal_fn(links), argnums=(5, 6, 7))
    )(*scattered[:5], *prior, sigma2)
    for chunk_size in (None, 4):
        fn = _log_marginal_fn(links, cells_per_leaf=3, chunk_size=chunk_size)
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(5, 6, 7)))(
            *blocked[:5], *prior, sigma2
        )
        np.testing.assert_allclose(float(value), float(want_value), rtol=1e-12)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10)


def test_cells_per_leaf_must_match_cell_count():
    (n, mean, m2, arm, leaf, noise_var), links, prior_cov, prior_mean = _marginal_inputs(161)
    fn = _log_marginal_fn(links, cells_per_leaf=2)
    with pytest.raises(ValueError, match="cells_per_leaf=2"):
        fn(*as_jax(n, mean, m2, arm, leaf, prior_cov, prior_mean, noise_var))


@pytest.mark.parametrize(
    "layout, shared_variance",
    [
        ({}, False),
        ({}, True),
        ({"chunk_size": 7}, False),
        ({"cells_per_leaf": 2, "chunk_size": 5}, False),
        ({"cells_per_leaf": 2, "chunk_size": 5}, True),
    ],
)
def test_grad_wrt_cell_means_and_variances_matches_finite_differences(layout, shared_variance):
    """Cell means move with covariate slopes and variances may differ per cell: the
    gradient reaches them through the leaf sums, in every layout."""
    rng = np.random.default_rng(171)
    parents = random_tree(rng, SIZES)
    prior_cov, prior_mean = random_prior(rng, 3)
    cells, _ = simulate_rows(rng, SIZES, parents, prior_cov, prior_mean)
    if "cells_per_leaf" in layout:
        stats = blocked_statistics(rng, cells, SIZES[-1])
    else:
        stats = cell_statistics(cells, padding=[(np.nan, np.nan, 0.0)])
    n, mean, m2, arm, leaf, noise_var = as_jax(*stats)
    observed = np.asarray(n) > 0
    if shared_variance:
        noise_var = jnp.asarray(0.9)
    links = tuple(jnp.asarray(p) for p in parents)
    fn = _log_marginal_fn(links, **layout)
    prior = as_jax(prior_cov, prior_mean)
    safe = lambda x, fill: jnp.where(observed, x, fill)  # noqa: E731  (finite FD steps)

    def value(mean, var):
        return fn(n, mean, m2, arm, leaf, *prior, var)

    value_and_grad = jax.jit(jax.value_and_grad(value, argnums=(0, 1)))
    _, (grad_mean, grad_var) = value_and_grad(mean, noise_var)
    assert np.all(np.asarray(grad_mean)[~observed] == 0)
    assert shared_variance or np.all(np.asarray(grad_var)[~observed] == 0)
    value_fn = jax.jit(value)
    eps = 1e-6
    for _ in range(3):
        d_mean = jnp.asarray(rng.normal(size=mean.shape)) * observed
        d_var = jnp.asarray(rng.uniform(0.1, 0.5, size=noise_var.shape)) * (
            1.0 if shared_variance else observed
        )
        up = float(value_fn(safe(mean + eps * d_mean, 0.0), noise_var + eps * d_var))
        down = float(value_fn(safe(mean - eps * d_mean, 0.0), noise_var - eps * d_var))
        fd = (up - down) / (2 * eps)
        ad_var = grad_var * d_var if shared_variance else jnp.sum(safe(grad_var * d_var, 0.0))
        ad = float(jnp.sum(safe(grad_mean * d_mean, 0.0)) + ad_var)
        np.testing.assert_allclose(ad, fd, rtol=1e-6, atol=1e-7)


def test_forward_mode_hessian_and_vmap():
    """The log marginal supports jvp (and so Hessians) and vmap, not only grad."""
    (n, mean, m2, arm, leaf, noise_var), links, prior_cov, prior_mean = _marginal_inputs(181)
    fn = _log_marginal_fn(links, chunk_size=4)
    data = as_jax(n, mean, m2, arm, leaf)
    cov = jnp.asarray(prior_cov)

    def value(mu, var):
        return fn(*data, cov, mu, var)

    mu, var = jnp.asarray(prior_mean), jnp.asarray(1.1)
    grads = jax.jit(jax.grad(value, argnums=(0, 1)))(mu, var)
    direction = (jnp.asarray([0.3, -0.7]), jnp.asarray(0.2))
    _, tangent = jax.jit(lambda *p: jax.jvp(value, p, direction))(mu, var)
    np.testing.assert_allclose(
        float(tangent), float(grads[0] @ direction[0] + grads[1] * direction[1]), rtol=1e-12
    )
    # μ enters the log marginal quadratically: its Hessian is constant, so central
    # differences of the gradient are exact up to rounding. (Unfolded: compiles faster.)
    unfolded = _log_marginal_fn(links)
    value = lambda mu, var: unfolded(*data, cov, mu, var)  # noqa: E731
    hessian = jax.jit(jax.hessian(value))(mu, var)
    grad_fn = jax.jit(jax.grad(value))
    eps = 1e-3
    for i in range(2):
        step = jnp.zeros(2).at[i].set(eps)
        fd = (grad_fn(mu + step, var) - grad_fn(mu - step, var)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(hessian[:, i]), np.asarray(fd), rtol=1e-8, atol=1e-10)
    value = lambda mu, var: fn(*data, cov, mu, var)  # noqa: E731
    mus = jnp.asarray(np.random.default_rng(181).normal(size=(3, 2)))
    batched = jax.jit(jax.vmap(jax.value_and_grad(value), in_axes=(0, None)))(mus, var)
    value_and_grad = jax.jit(jax.value_and_grad(value))
    for i in range(3):
        one = value_and_grad(mus[i], var)
        np.testing.assert_allclose(float(batched[0][i]), float(one[0]), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(batched[1][i]), np.asarray(one[1]), rtol=1e-10)


def test_float32_blocked_cells_stay_float32():
    rng = np.random.default_rng(191)
    parents = random_tree(rng, SIZES)
    prior_cov, prior_mean = random_prior(rng, 3)
    cells, rows = simulate_rows(rng, SIZES, parents, prior_cov, prior_mean)
    n, mean, m2, arm, leaf, noise_var = blocked_statistics(rng, cells, SIZES[-1])
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    links = tuple(jnp.asarray(p) for p in parents)
    fn = _log_marginal_fn(links, cells_per_leaf=2, chunk_size=5)
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(1, 5, 6, 7)))(
        f32(n), f32(mean), f32(m2), jnp.asarray(arm), jnp.asarray(leaf),
        f32(prior_cov), f32(prior_mean), f32(noise_var),
    )
    assert {x.dtype for x in (value, *grads)} == {jnp.dtype(jnp.float32)}
    expected = dense_row_log_density(rows, SIZES, parents, prior_cov, prior_mean)
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
