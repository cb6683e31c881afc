"""Binary and count outcomes over cells: bernoulli, binomial (logit link), poisson (log link).

Unit i in leaf g, arm t:  η = α_g + τ_g·t;  y ~ Bernoulli/Binomial(trials, logit⁻¹ η) or
Poisson(E·exp η). Each level's (α_v, τ_v) = parent's + N(0, Σ_ℓ) as in the Gaussian model.
Without covariates a cell's (successes Σy, size Σtrials or ΣE) is lossless.

Parameters live on the link scale (log odds, log rate), which is already unit free:
no standardisation. Two models share the hyperparameter block:

- ``laplace_model``: every group's (α, τ) integrated out by a Laplace approximation
  computed with the Gaussian-tree solver (MATH.md, "Binary and count outcomes");
- ``joint_model``: the full joint model, non-centred, the reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from engine.cells import Cells
from engine.encode import Encoding
from engine.models import gaussian
from engine.priors import Prior

# Newton iterations toward the mode before giving up, the convergence tolerance on the
# largest change of any leaf's (α, τ) (the live Newton step after it squares the error,
# quadratic convergence), and the largest step any coordinate may take in one
# iteration (a damping guard for iterates far in the tail; inactive near the mode).
NEWTON_MAX_STEPS = 50
NEWTON_TOL = 1e-7
NEWTON_MAX_STEP = 4.0
# Small leaves, one level fitted: the leaves are then independent given the hyperparameters,
# and a leaf's integral depends only on its (successes, size) per arm. Leaves whose larger
# arm has at most SMALL_SIZE trials (logit) or SMALL_COUNT events (log) are integrated by
# adaptive Gauss–Hermite quadrature with QUADRATURE_NODES per dimension (7 × 7 = 49 nodes),
# once per distinct configuration (a long tail repeats a few configurations many times:
# 16,155 small leaves of 20,000 had 1,465), as long as there are at most MAX_CONFIGURATIONS.
# Every other leaf, and every leaf of a nested tree, uses the Laplace approximation.
# Measured (tests/statistical/test_glm.py; 3 rows per group, 300 groups): plain Laplace put
# σ_α 0.5 posterior sd above full NUTS (1.41 vs 1.26); 5 or more nodes per dimension matched
# NUTS (1.24), 3 did not (1.41). Against a brute-force integral of 50 sparse leaves the log
# marginal's error was 0.15 nats with 1 node, 0.20 with 3, 0.006 with 5 and 1e-4 with 9.
QUADRATURE_NODES = 7
SMALL_SIZE = 10.0
SMALL_COUNT = 10.0
MAX_CONFIGURATIONS = 50_000


class GLMData(NamedTuple):
    """Cell totals, padded with size-0 cells; ``init`` is where Newton starts for each leaf.

    The same totals twice: one row per cell (the joint model indexes leaves by cell, as a
    user's model would) and densely per leaf and arm (``leaf_successes``, ``leaf_size``,
    zeros for a missing arm or a padding leaf), which `laplace` uses without any scatter.
    """

    successes: np.ndarray  # (cells,) Σy
    size: np.ndarray       # (cells,) Σtrials (logit) or Σexposure (log); 0 for padding
    arm: np.ndarray        # (cells,) float 0/1
    leaf: np.ndarray       # (cells,) int32
    init: np.ndarray       # (leaves, 2) smoothed empirical (α, τ) of each leaf
    leaf_successes: np.ndarray  # (leaves, 2) Σy per leaf, control and treated
    leaf_size: np.ndarray       # (leaves, 2) size per leaf, control and treated
    # One level only (empty otherwise): the quadrature table of distinct small-leaf
    # configurations and how many leaves share each, and the other ("large") leaves, whose
    # integrals are Laplace approximations. Zero rows pad both to bucketed sizes.
    quad_successes: np.ndarray = None  # (configurations, 2)
    quad_size: np.ndarray = None       # (configurations, 2)
    quad_count: np.ndarray = None      # (configurations,) leaves with this configuration
    large_successes: np.ndarray = None  # (large leaves, 2)
    large_size: np.ndarray = None       # (large leaves, 2)
    large_init: np.ndarray = None       # (large leaves, 2) where Newton starts
    # With covariates (cells keyed by covariate bin, several per leaf and arm): each cell's
    # covariate means, centred at the pooled means (cells, k), and its rows (for averaging
    # effects over a leaf's rows). One level: the cells of small leaves (integrated by
    # quadrature leaf by leaf, no configuration table) and of the other leaves, renumbered.
    x: np.ndarray = None                # (cells, k)
    rows: np.ndarray = None             # (cells,)
    small_cells: "CellSet" = None
    large_cells: "CellSet" = None


class CellSet(NamedTuple):
    """A subset of the cells with its own leaf numbering (see ``GLMData.small_cells``)."""

    successes: np.ndarray  # (cells,)
    size: np.ndarray
    arm: np.ndarray
    leaf: np.ndarray       # (cells,) int32, 0..leaves-1 within the set
    x: np.ndarray          # (cells, k)
    init: np.ndarray       # (leaves, 2)


def link_of(family: str) -> str:
    from kernels.glm import LINKS

    return LINKS[family]


def link_value(link: str, rate: float) -> float:
    rate = min(max(rate, 1e-12), 1 - 1e-12) if link == "logit" else max(rate, 1e-300)
    return math.log(rate / (1 - rate)) if link == "logit" else math.log(rate)


def cell_totals(cells: Cells, family: str, weight: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(successes, size) per cell row: Σy, and Σtrials / Σexposure / n."""
    table = cells.table
    n = table["n"].to_numpy().astype(np.float64)
    successes = n * table["mean"].to_numpy()
    size = n * table[f"x_mean__{weight}"].to_numpy() if weight else n
    return np.round(successes, 9), size


def pooled_rate(cells: Cells, family: str, weight: str | None) -> float:
    successes, size = cell_totals(cells, family, weight)
    return float(successes.sum() / max(size.sum(), 1e-300))


def default_priors(cells: Cells, family: str, weight: str | None, levels, covariates=()) -> dict[str, Prior]:
    """Weakly informative priors on the link scale (log odds or log rate).

    ========================  =========================================
    ``baseline_mean``         normal(link(pooled rate), 2.5)
    ``effect_mean``           normal(0, 1)    (odds or rate ratio within e^±2 at 95%)
    ``baseline_scale``        halfnormal(1)   (each level)
    ``effect_scale``          halfnormal(0.5) (each level)
    ``slope``                 normal(0, 1/s_x) (each covariate: a 1-sd change moves the
                              log odds or log rate by at most about ±2 at 95%)
    ========================  =========================================
    """
    centre = link_value(link_of(family), pooled_rate(cells, family, weight))
    priors = {"baseline_mean": Prior("normal", (round(centre, 6), 2.5)),
              "effect_mean": Prior("normal", (0.0, 1.0))}
    for level in levels:
        priors[f"baseline_scale.{level}"] = Prior("halfnormal", (1.0,))
        priors[f"effect_scale.{level}"] = Prior("halfnormal", (0.5,))
    moments = cells.pooled_moments() if covariates else {}
    for x in covariates:
        sd = moments[x][1]
        priors[f"slope.{x}"] = Prior("normal", (0.0, round(1.0 / sd if sd > 0 and math.isfinite(sd) else 1.0, 6)))
    return priors


def build(cells: Cells, encoding: Encoding, priors: dict[str, Prior], family: str,
          weight: str | None, covariates=()) -> gaussian.Problem:
    """The GLM problem: padded cell totals and the padded tree, priors as given (link scale).

    With covariates the cells are keyed by covariate bin as well (several per leaf and arm);
    each cell's rows share its mean covariate values, centred and scaled by the pooled
    moments, so slopes are sampled per pooled sd (``std_priors``) and reported per unit.
    """
    successes, size = cell_totals(cells, family, weight)
    link = link_of(family)
    num_nodes, parents, leaf_rows = gaussian.padded_tree(encoding)
    leaves = num_nodes[-1] if num_nodes else 1
    arm = cells.table["arm"].to_numpy().astype(np.float64)
    leaf = encoding.cell_leaf.astype(np.int32)
    init = _initial_values(link, successes, size, arm, leaf, leaves, pooled_rate(cells, family, weight),
                           size.sum() / max(cells.n_rows, 1))
    padded = gaussian.bucket(successes.shape[0])

    def pad(values, dtype=np.float64):
        out = np.zeros(padded, dtype=dtype)
        out[: values.shape[0]] = values
        return out

    leaf_successes = per_leaf_arm(successes, arm, leaf, leaves)
    leaf_size = per_leaf_arm(size, arm, leaf, leaves)
    covariates = tuple(covariates)
    # Only the covariates' moments: a trials or exposure column of a cell table from
    # elsewhere may come without its co-moments.
    moments = cells.pooled_moments() if covariates else {}
    shift = np.array([moments[c][0] for c in covariates])
    scale = np.array([moments[c][1] if moments[c][1] > 0 else 1.0 for c in covariates])
    std = gaussian.Standardisation(0.0, 1.0, shift, scale)
    if covariates:
        x = np.stack([cells.table[f"x_mean__{c}"].to_numpy() for c in covariates], -1)
        x = (x - shift) / scale
        rows = cells.table["n"].to_numpy().astype(np.float64)
        extra = {"x": pad_rows(x, padded), "rows": pad(rows), "quad_count": np.zeros(0),
                 **binned_sets(link, successes, size, arm, leaf, x, init, leaf_size if link == "logit"
                               else leaf_successes, len(num_nodes))}
    else:
        extra = quadrature_table(link, leaf_successes, leaf_size, init, len(num_nodes))
    data = GLMData(successes=pad(successes), size=pad(size), arm=pad(arm), leaf=pad(leaf, np.int32), init=init,
                   leaf_successes=leaf_successes, leaf_size=leaf_size, **extra)
    std_priors = gaussian.standardised_priors(priors, std, cells.levels, covariates)
    return gaussian.Problem(data=data, parents=parents, num_nodes=num_nodes, levels=tuple(cells.levels),
                            covariates=covariates, std_priors=std_priors, standardisation=std,
                            leaf_rows=leaf_rows, real_nodes=encoding.num_nodes)


def pad_rows(values: np.ndarray, rows: int) -> np.ndarray:
    """``values`` with zero rows appended up to ``rows`` (first dimension)."""
    out = np.zeros((rows,) + values.shape[1:], dtype=values.dtype)
    out[: values.shape[0]] = values
    return out


def binned_sets(link, successes, size, arm, leaf, x, init, measure, num_levels: int) -> dict:
    """One level, cells keyed by covariate bin: the cells of small leaves (larger arm's total
    ``measure`` ≤ SMALL_SIZE trials or SMALL_COUNT events) and of the others, each set with
    its leaves renumbered and padded, so `laplace` integrates small leaves by quadrature."""
    if num_levels != 1:
        return {}
    limit = SMALL_SIZE if link == "logit" else SMALL_COUNT
    observed = measure.sum(axis=1) > 0
    small_leaf = (measure.max(axis=1) <= limit) & observed

    def cell_set(chosen_leaves):
        chosen = chosen_leaves[leaf]
        number = np.cumsum(chosen_leaves) - 1
        leaves = gaussian.bucket(int(chosen_leaves.sum()))
        cells = gaussian.bucket(int(chosen.sum()))
        return CellSet(successes=pad_rows(successes[chosen], cells), size=pad_rows(size[chosen], cells),
                       arm=pad_rows(arm[chosen], cells), leaf=pad_rows(number[leaf[chosen]].astype(np.int32), cells),
                       x=pad_rows(x[chosen], cells), init=pad_rows(init[chosen_leaves], leaves))

    return {"small_cells": cell_set(small_leaf), "large_cells": cell_set(observed & ~small_leaf)}


def quadrature_table(link: str, leaf_successes, leaf_size, init, num_levels: int, rows: int = 0) -> dict:
    """The GLMData fields that split one level's leaves into the quadrature table (small
    leaves, by distinct configuration) and the large leaves (see ``QUADRATURE_NODES``).

    Padding leaves (size 0 in both arms) are left out of both: they integrate to one. Both
    tables are padded to a bucketed size, at least ``rows`` (fixed shapes across data sets of
    one layout, as in calibration, compile once).
    """
    empty = np.zeros((0, 2))
    if num_levels != 1:
        return {"quad_successes": empty, "quad_size": empty, "quad_count": np.zeros(0),
                "large_successes": empty, "large_size": empty, "large_init": empty}
    measure = leaf_size if link == "logit" else leaf_successes
    limit = SMALL_SIZE if link == "logit" else SMALL_COUNT
    observed = leaf_size.sum(axis=1) > 0
    small = (measure.max(axis=1) <= limit) & observed
    configs, counts = np.unique(np.concatenate([leaf_successes[small], leaf_size[small]], axis=1), axis=0,
                                return_counts=True)
    if configs.shape[0] > MAX_CONFIGURATIONS:
        small[:] = False
        configs, counts = np.zeros((0, 4)), np.zeros(0)
    large = observed & ~small

    def padded(values):
        out = np.zeros((gaussian.bucket(max(values.shape[0], rows)),) + values.shape[1:])
        out[: values.shape[0]] = values
        return out

    table = padded(configs)
    return {"quad_successes": table[:, :2], "quad_size": table[:, 2:], "quad_count": padded(counts),
            "large_successes": padded(leaf_successes[large]), "large_size": padded(leaf_size[large]),
            "large_init": padded(init[large])}


def quadrature_nodes(data: GLMData) -> int:
    """Gauss–Hermite nodes per small-leaf integral (1: every leaf uses Laplace), for the record."""
    return QUADRATURE_NODES**2 if small_leaves(data) > 0 else 1


def small_leaves(data: GLMData) -> int:
    """Leaves integrated by quadrature (the rest by Laplace), for the record."""
    if data.small_cells is not None:
        cells = data.small_cells
        return int(np.unique(np.asarray(cells.leaf)[np.asarray(cells.size) > 0]).size)
    return int(np.asarray(data.quad_count).sum()) if data.quad_count is not None else 0


def per_leaf_arm(values, arm, leaf, leaves) -> np.ndarray:
    """(leaves, 2) totals by leaf and arm from per-cell values."""
    index = leaf.astype(np.int64) * 2 + arm.astype(np.int64)
    return np.bincount(index, values, minlength=2 * leaves).reshape(leaves, 2)


def _initial_values(link, successes, size, arm, leaf, leaves, rate, size_per_row):
    """Each leaf's empirical (α, τ), each arm shrunk by two rows' worth of the pooled rate."""
    prior_size = 2.0 * size_per_row
    out = np.zeros((leaves, 2))
    per_arm = []
    for t in (0, 1):
        mask = arm == t
        s = np.bincount(leaf[mask], successes[mask], minlength=leaves)
        m = np.bincount(leaf[mask], size[mask], minlength=leaves)
        r = (s + prior_size * rate) / (m + prior_size)
        per_arm.append(np.log(r / (1 - r)) if link == "logit" else np.log(np.maximum(r, 1e-300)))
    out[:, 0] = per_arm[0]
    out[:, 1] = per_arm[1] - per_arm[0]
    return out


# --- the hyperparameters ----------------------------------------------------------------


def hyper_names(priors: dict) -> list[str]:
    return gaussian.hyper_names(priors)


def sample_hyper(priors, levels) -> dict:
    """Sample (μ_α, μ_τ, and per level σ_α, σ_τ, ρ) as NumPyro sites; returns them by name."""
    import numpyro

    from engine.models import to_numpyro

    hyper = {name: numpyro.sample(name, to_numpyro(priors[name])) for name in ("baseline_mean", "effect_mean")}
    for name in sorted(n for n in priors if n.startswith("slope.")):
        hyper[name] = numpyro.sample(name, to_numpyro(priors[name]))
    for level in levels:
        s_alpha, s_tau, rho = gaussian._sample_scales(level, priors)
        hyper[f"baseline_scale.{level}"], hyper[f"effect_scale.{level}"] = s_alpha, s_tau
        hyper[f"correlation.{level}"] = rho
    return hyper


def slope_vector(hyper: dict, covariates):
    """(k,) slopes in ``covariates`` order (standardised units), or None without covariates."""
    import jax.numpy as jnp

    return jnp.stack([hyper[f"slope.{c}"] for c in covariates]) if covariates else None


def observations(data: GLMData, slope):
    """The likelihood's data for ``kernels.glm``: dense per (leaf, arm) totals, or, with
    covariates, the cells with their offsets x̄ᵀβ."""
    from kernels.glm import BinnedLeaves, Leaves

    if slope is None:
        return Leaves(data.leaf_successes, data.leaf_size)
    return BinnedLeaves(data.successes, data.size, data.arm, data.leaf, data.x @ slope)


def _cell_set_observations(cells: CellSet, slope):
    from kernels.glm import BinnedLeaves

    return BinnedLeaves(cells.successes, cells.size, cells.arm, cells.leaf, cells.x @ slope)


def effect_cells(data: GLMData, slope):
    """``outcome_effects``'s per-cell (leaf, offset, rows) with covariates; None without."""
    return None if slope is None else (data.leaf, data.x @ slope, data.rows)


def original_units(problem, samples: dict) -> dict:
    """The hyperparameter draws as reported: slopes per unit of their covariate (sampled per
    pooled sd), everything else as sampled (link scale)."""
    std, covariates = problem.standardisation, tuple(problem.covariates)
    return {name: np.asarray(gaussian.to_original_units(name, np.asarray(samples[name]), std, covariates))
            for name in hyper_names(problem.std_priors)}


def tree_prior(hyper: dict, levels):
    """(Σ_ℓ (L, 2, 2), μ (2,)) from one hyperparameter value."""
    scales = [(hyper[f"baseline_scale.{lv}"], hyper[f"effect_scale.{lv}"],
               hyper.get(f"correlation.{lv}", 0.0 * hyper[f"effect_scale.{lv}"])) for lv in levels]
    return gaussian.level_covariances(scales), gaussian._stack(hyper["baseline_mean"], hyper["effect_mean"])


# --- Laplace on the Gaussian tree ---------------------------------------------------------


def _newton_step(theta, obs, parents, prior_cov, prior_mean, link, num_nodes):
    """The mode of (second-order expansion at θ of the log-likelihood) × (the tree prior):
    one Newton step on the joint log posterior of every node, as one tree solve (elementwise
    over leaves when there is one level)."""
    from kernels import gaussian_tree as tree
    from kernels.glm import independent_newton_step, leaf_expansion

    if len(num_nodes) == 1:
        return independent_newton_step(link, theta, obs, prior_cov[0], prior_mean)

    w, h, _ = leaf_expansion(link, theta, obs)
    upward = tree.integrate(w, h, tuple(parents), prior_cov, prior_mean, num_top=num_nodes[0])
    return tree.posterior_means(upward, tuple(parents), prior_cov, prior_mean)[-1]


def _damped_newton(step, start, dtype):
    """Iterate ``step`` (without derivatives) from ``start`` until the largest change is below
    ``NEWTON_TOL``; each move is clipped to ``NEWTON_MAX_STEP``. Returns (θ, iterations)."""
    import jax
    import jax.numpy as jnp

    def body(state):
        count, theta, _ = state
        move = jnp.clip(step(theta) - theta, -NEWTON_MAX_STEP, NEWTON_MAX_STEP)
        return count + 1, theta + move, jnp.max(jnp.abs(move), initial=0.0)

    def cond(state):
        count, _, change = state
        return (count < NEWTON_MAX_STEPS) & (change > NEWTON_TOL)

    count, theta, _ = jax.lax.while_loop(cond, body, (0, start, jnp.asarray(jnp.inf, dtype)))
    return jax.lax.stop_gradient(theta), count


def laplace_mode(data, parents, prior_cov, prior_mean, *, link, num_nodes, slope=None):
    """The joint posterior mode of every leaf's (α, τ) given the hyperparameters.

    Newton iterations run without derivatives until the largest change is below
    ``NEWTON_TOL``; one more Newton step is taken on the live hyperparameters. At the
    mode, that step's derivative with respect to the hyperparameters is exactly the
    implicit-function derivative dθ̂/dφ = −H⁻¹ ∂²log p/∂θ∂φ, so gradients cost one solve.
    Returns (mode (G, 2), iterations taken).
    """
    import jax
    import jax.numpy as jnp

    obs = observations(data, slope)
    frozen_cov, frozen_mean = jax.lax.stop_gradient(prior_cov), jax.lax.stop_gradient(prior_mean)
    frozen_obs = jax.lax.stop_gradient(obs)
    theta, steps = _damped_newton(
        lambda t: _newton_step(t, frozen_obs, parents, frozen_cov, frozen_mean, link, num_nodes),
        jnp.asarray(data.init, dtype=prior_mean.dtype), prior_mean.dtype)
    return _newton_step(theta, obs, parents, prior_cov, prior_mean, link, num_nodes), steps


def _independent_mode(obs, start, prior_cov, prior_mean, link):
    """Modes of independent leaves under N(μ, Σ) (one level), with the implicit-gradient step."""
    import jax

    from kernels.glm import independent_newton_step

    frozen_cov, frozen_mean = jax.lax.stop_gradient(prior_cov), jax.lax.stop_gradient(prior_mean)
    frozen_obs = jax.lax.stop_gradient(obs)
    theta, steps = _damped_newton(
        lambda t: independent_newton_step(link, t, frozen_obs, frozen_cov, frozen_mean),
        start.astype(prior_mean.dtype), prior_mean.dtype)
    return independent_newton_step(link, theta, obs, prior_cov, prior_mean), steps


def laplace_upward(data, parents, prior_cov, prior_mean, *, link, num_nodes, slope=None):
    """The Gaussian tree of the Laplace approximation at the mode, and its log marginal.

    With the log-likelihood replaced by its expansion at the mode θ̂, the joint
    posterior is Gaussian and its normaliser is the Laplace approximation:
    log p(y | φ) ≈ Σ c_g + log ∫ exp(Σ_g h_gᵀθ_g − ½θ_gᵀW_gθ_g) p(θ | φ) dθ
                 = log p(y | θ̂) + log p(θ̂ | φ) − ½ log|H| + (d/2) log 2π.
    Returns (upward, log marginal, Newton iterations).
    """
    from kernels import gaussian_tree as tree
    from kernels.glm import leaf_expansion

    mode, steps = laplace_mode(data, parents, prior_cov, prior_mean, link=link, num_nodes=num_nodes, slope=slope)
    w, h, constant = leaf_expansion(link, mode, observations(data, slope))
    upward = tree.integrate(w, h, tuple(parents), prior_cov, prior_mean, num_top=num_nodes[0])
    return upward, upward.log_normaliser + constant, steps


def log_marginal(data, parents, prior_cov, prior_mean, *, link, num_nodes, slope=None):
    """The approximate log p(y | φ) NUTS samples on: with one level, Laplace for large leaves
    plus adaptive Gauss–Hermite quadrature for small ones (by configuration, ``quadrature_table``;
    leaf by leaf with covariates, ``binned_sets``); nested, Laplace on the tree."""
    if len(num_nodes) != 1:
        return laplace_upward(data, parents, prior_cov, prior_mean, link=link, num_nodes=num_nodes,
                              slope=slope)[1]
    cov = prior_cov[0]
    if slope is not None:
        large, small = data.large_cells, data.small_cells
        return (leaf_log_marginals(_cell_set_observations(large, slope), large.init, cov, prior_mean, link, 1).sum()
                + leaf_log_marginals(_cell_set_observations(small, slope), small.init, cov, prior_mean, link,
                                      QUADRATURE_NODES).sum())
    return table_log_marginal(data, cov, prior_mean, link)


def table_log_marginal(data, cov, prior_mean, link, rows=None):
    """One level without covariates: Σ over the large-leaf table (Laplace) plus Σ over the
    small-leaf configurations (quadrature) × the leaves sharing each. ``rows``, if given, is a
    minibatch (large rows, their weights, configuration rows, their weights including the
    leaf counts) whose weighted sum estimates the same total."""
    import jax.numpy as jnp

    from kernels.glm import Leaves

    if rows is None:
        rows = (slice(None), 1.0, slice(None), data.quad_count)
    large, large_weight, quad, quad_weight = rows
    total = 0.0
    if data.large_size.shape[0]:
        obs = Leaves(data.large_successes[large], data.large_size[large])
        total = total + jnp.sum(large_weight * leaf_log_marginals(obs, data.large_init[large], cov, prior_mean,
                                                                  link, 1))
    if data.quad_size.shape[0]:
        obs = Leaves(data.quad_successes[quad], data.quad_size[quad])
        start = jnp.broadcast_to(prior_mean, obs.size.shape)
        total = total + jnp.sum(quad_weight * leaf_log_marginals(obs, start, cov, prior_mean, link,
                                                                 QUADRATURE_NODES))
    return total


def leaf_log_marginals(obs, start, cov, prior_mean, link, nodes_per_dim):
    """Each independent leaf's log ∫ p(y | θ) N(θ; μ, Σ) dθ, around its mode (found from ``start``)."""
    from kernels.glm import independent_log_marginal

    if start.shape[0] == 0:
        return prior_mean[:0]
    mode, _ = _independent_mode(obs, start, cov, prior_mean, link)
    return independent_log_marginal(link, mode, obs, cov, prior_mean, nodes_per_dim)


def laplace_model(data, parents, *, levels, num_nodes, priors, link, covariates=()):
    """The `laplace` model: NUTS sees the hyperparameters only, on the approximate marginal."""
    import numpyro

    hyper = sample_hyper(priors, levels)
    prior_cov, prior_mean = tree_prior(hyper, levels)
    numpyro.factor("marginal", log_marginal(data, parents, prior_cov, prior_mean, link=link, num_nodes=num_nodes,
                                            slope=slope_vector(hyper, covariates)))


# --- the full joint model (reference) -----------------------------------------------------


def cell_log_likelihood(data: GLMData, alpha_leaf, tau_leaf, link, slope=None):
    from kernels.glm import cell_terms

    eta = alpha_leaf[data.leaf] + tau_leaf[data.leaf] * data.arm
    if slope is not None:
        eta = eta + data.x @ slope
    return cell_terms(link, eta, data.successes, data.size)[0].sum()


def joint_model(data, parents, *, levels, num_nodes, priors, link, covariates=()):
    """Every group's (α, τ) sampled, non-centred; the reference for `laplace` and `svi`."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    from engine.models import to_numpyro

    alpha = jnp.reshape(numpyro.sample("baseline_mean", to_numpyro(priors["baseline_mean"])), (1,))
    tau = jnp.reshape(numpyro.sample("effect_mean", to_numpyro(priors["effect_mean"])), (1,))
    slope = (jnp.stack([numpyro.sample(f"slope.{c}", to_numpyro(priors[f"slope.{c}"])) for c in covariates])
             if covariates else None)
    for depth, (level, size) in enumerate(zip(levels, num_nodes)):
        above = jnp.zeros(size, dtype=jnp.int32) if depth == 0 else parents[depth - 1]
        s_alpha, s_tau, _ = gaussian._sample_scales(level, priors)
        z_alpha = numpyro.sample(f"baseline_z.{level}", dist.Normal(0.0, 1.0).expand([size]).to_event(1))
        z_tau = numpyro.sample(f"effect_z.{level}", dist.Normal(0.0, 1.0).expand([size]).to_event(1))
        alpha = alpha[above] + s_alpha * z_alpha
        tau = tau[above] + s_tau * gaussian._correlated(z_tau, z_alpha, priors, level)
    numpyro.factor("cells", cell_log_likelihood(data, alpha, tau, link, slope))


def node_latents(draws: dict, parents, levels, num_nodes):
    """(α, τ) of every node at every level from one draw of the joint model (vmap it)."""
    import jax.numpy as jnp

    alpha = jnp.reshape(draws["baseline_mean"], (1,))
    tau = jnp.reshape(draws["effect_mean"], (1,))
    out = []
    for depth, (level, size) in enumerate(zip(levels, num_nodes)):
        above = jnp.zeros(size, dtype=jnp.int32) if depth == 0 else parents[depth - 1]
        z_alpha = draws[f"baseline_z.{level}"]
        alpha = alpha[above] + draws[f"baseline_scale.{level}"] * z_alpha
        tau = tau[above] + draws[f"effect_scale.{level}"] * gaussian._correlated(draws[f"effect_z.{level}"],
                                                                                 z_alpha, draws, level)
        out.append(jnp.stack([alpha, tau], -1))
    return out


def outcome_effects(leaf_theta, leaf_rows, parents, num_nodes, link, cells=None):
    """Effects on the outcome scale from one draw of every leaf's (α, τ) (vmap it).

    A leaf's effect is g⁻¹(α + τ) − g⁻¹(α) (risk or rate difference; every row of a
    leaf shares it); with covariates, ``cells`` = (leaf, offset x̄ᵀβ, rows) per cell and the
    leaf's effect averages g⁻¹(α + τ + o) − g⁻¹(α + o) over its rows. A node above averages
    its leaves' effects over their rows.
    Returns (per level (nodes,) effects, the row-weighted average over all leaves).
    """
    import jax
    import jax.numpy as jnp

    from kernels.glm import inverse_link

    a, t = leaf_theta[:, 0], leaf_theta[:, 1]
    if cells is None:
        effect = inverse_link(link, a + t) - inverse_link(link, a)
    else:
        leaf, offset, rows = cells
        eta = a[leaf] + offset
        per_cell = (inverse_link(link, eta + t[leaf]) - inverse_link(link, eta)) * rows
        total = jax.ops.segment_sum(per_cell, leaf, num_segments=a.shape[0])
        effect = total / jnp.where(leaf_rows > 0, leaf_rows, 1.0)
    out = [effect]
    weighted, rows = effect * leaf_rows, leaf_rows
    for depth in range(len(num_nodes) - 2, -1, -1):
        weighted = jax.ops.segment_sum(weighted, parents[depth], num_segments=num_nodes[depth])
        rows = jax.ops.segment_sum(rows, parents[depth], num_segments=num_nodes[depth])
        out.insert(0, jnp.where(rows > 0, weighted / jnp.where(rows > 0, rows, 1.0), 0.0))
    ate = jnp.sum(effect * leaf_rows) / jnp.sum(leaf_rows)
    return out, ate


def new_group_effects(hyper: dict, levels, link: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """Effect in an unseen top-level group, per hyperparameter draw: (outcome scale, link scale).

    (α, τ) ~ N(μ, Σ_top) with the top level's scales and correlation; without levels, μ itself.
    """
    alpha, tau = np.asarray(hyper["baseline_mean"], float), np.asarray(hyper["effect_mean"], float)
    if levels:
        top = levels[0]
        s_a, s_t = hyper[f"baseline_scale.{top}"], hyper[f"effect_scale.{top}"]
        rho = hyper.get(f"correlation.{top}", np.zeros_like(s_t))
        z_a, z_t = rng.standard_normal(alpha.shape), rng.standard_normal(alpha.shape)
        alpha = alpha + s_a * z_a
        tau = tau + s_t * (rho * z_a + np.sqrt(1 - rho**2) * z_t)
    if link == "logit":
        def inverse(eta):
            return 1.0 / (1.0 + np.exp(-eta))
    else:
        def inverse(eta):
            return np.exp(np.minimum(eta, 60.0))
    return inverse(alpha + tau) - inverse(alpha), tau
