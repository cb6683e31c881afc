"""The Gaussian hierarchy over cells.

Unit i in leaf g, arm t, covariates x:  y = α_g + τ_g·t + βᵀx + ε,  ε ~ N(0, σ_y²).
Each level's (α_v, τ_v) = parent's + N(0, diag(σ_α,ℓ², σ_τ,ℓ²)); the top
level's parent is (μ_α, μ_τ).

The model works in standardised units (outcome centred on its mean and divided
by its sd, covariates likewise) so that one sampler tuning serves every data
scale; ``Standardisation`` maps parameters back. The likelihood uses only the
cell statistics, which is lossless for a Gaussian outcome: for a cell with
n rows, residual mean r̄ = ȳ − βᵀx̄ and residual sum of squares
M2_r = M2 − 2βᵀSxy + βᵀSxxβ,

    log p = −n/2·log(2πσ²) − (M2_r + n (r̄ − α − τ·t)²) / (2σ²).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from engine.cells import Cells
from engine.encode import Encoding
from engine.priors import Prior

# Padded cell counts are rounded up to these multiples so that a new row or
# group count rarely changes a compiled shape (the sizes grow by ~12%).
_BUCKET_BASE = 64


def bucket(size: int, base: int = _BUCKET_BASE) -> int:
    """Smallest bucket ≥ size: multiples of ``base``, coarsening to steps of 1/8 of the
    power of two below (so padding wastes at most ~12%)."""
    if size <= base:
        return base
    power = 1 << (size - 1).bit_length() - 1
    step = max(power // 8, base)
    return -(-size // step) * step


class CellData(NamedTuple):
    """Cell statistics in standardised units, padded with n = 0 cells."""

    n: np.ndarray      # (cells,) float  rows in the cell (0 for padding)
    mean: np.ndarray   # (cells,) float  standardised mean outcome
    m2: np.ndarray     # (cells,) float  standardised Σ(y−ȳ)²
    arm: np.ndarray    # (cells,) float  0 control, 1 treated
    leaf: np.ndarray   # (cells,) int32  leaf code
    x_mean: np.ndarray  # (cells, k) float standardised covariate means
    xy_m2: np.ndarray   # (cells, k) float Σ(x−x̄)(y−ȳ), standardised
    xx_m2: np.ndarray   # (cells, k, k) float Σ(x−x̄)(x−x̄)ᵀ, standardised


class EstimateData(NamedTuple):
    """Summary-level input in standardised units: one row per leaf group."""

    estimate: np.ndarray   # (leaves,) float  effect estimate / y_scale
    precision: np.ndarray  # (leaves,) float  1 / (stderr / y_scale)²


class Standardisation(NamedTuple):
    y_shift: float
    y_scale: float
    x_shift: np.ndarray  # (k,)
    x_scale: np.ndarray  # (k,)


def standardise(cells: Cells, encoding: Encoding, y_mean: float, y_sd: float,
                x_means: dict, x_sds: dict) -> tuple[CellData, Standardisation]:
    table = cells.table
    covs = list(cells.covariates)
    k = len(covs)
    y_scale = y_sd if y_sd > 0 else 1.0
    x_shift = np.array([x_means[c] for c in covs], dtype=np.float64)
    x_scale = np.array([x_sds[c] if x_sds[c] > 0 else 1.0 for c in covs], dtype=np.float64)
    size = table.height
    padded = bucket(size)

    def pad(values, fill=0.0):
        values = np.asarray(values)
        out = np.full((padded,) + values.shape[1:], fill, dtype=values.dtype)
        out[:size] = values
        return out

    x_mean = np.zeros((size, k))
    xy_m2 = np.zeros((size, k))
    xx_m2 = np.zeros((size, k, k))
    for i, a in enumerate(covs):
        x_mean[:, i] = (table[f"x_mean__{a}"].to_numpy() - x_shift[i]) / x_scale[i]
        xy_m2[:, i] = table[f"xy_m2__{a}"].to_numpy() / (x_scale[i] * y_scale)
        for j in range(i, k):
            value = table[f"xx_m2__{a}__{covs[j]}"].to_numpy() / (x_scale[i] * x_scale[j])
            xx_m2[:, i, j] = value
            xx_m2[:, j, i] = value
    data = CellData(
        n=pad(table["n"].to_numpy().astype(np.float64)),
        mean=pad((table["mean"].to_numpy() - y_mean) / y_scale),
        m2=pad(table["m2"].to_numpy() / y_scale**2),
        arm=pad(table["arm"].to_numpy().astype(np.float64)),
        leaf=pad(encoding.cell_leaf.astype(np.int32), 0),
        x_mean=pad(x_mean), xy_m2=pad(xy_m2), xx_m2=pad(xx_m2),
    )
    return data, Standardisation(y_mean, y_scale, x_shift, x_scale)


def standardise_prior(prior: Prior, shift: float, scale: float) -> Prior:
    """The prior of (value − shift) / scale, for the families of engine.priors."""
    f, a = prior.family, prior.args
    if f == "normal":
        return Prior(f, ((a[0] - shift) / scale, a[1] / scale))
    if f == "student_t":
        return Prior(f, (a[0], (a[1] - shift) / scale, a[2] / scale))
    if f in ("halfnormal", "halfcauchy"):
        return Prior(f, (a[0] / scale,))
    if f == "exponential":
        return Prior(f, (a[0] * scale,))
    raise ValueError(f"unknown prior family {f}")


def standardised_priors(priors: dict[str, Prior], std: Standardisation, levels, covariates) -> dict:
    """Every prior in standardised units; the set of keys also fixes the model's structure
    (``noise.control``/``noise.treated`` for per-arm noise, ``correlation.LEVEL`` for
    correlated baseline and effect)."""
    out = {}
    for name, prior in priors.items():
        base, _, rest = name.partition(".")
        if base == "baseline_mean":
            out[name] = standardise_prior(prior, std.y_shift, std.y_scale)
        elif base == "slope":
            # β' = β·s_x/s_y, so the prior scales by s_x/s_y.
            out[name] = standardise_prior(prior, 0.0, std.y_scale / std.x_scale[list(covariates).index(rest)])
        elif base == "correlation":
            out[name] = prior
        else:
            out[name] = standardise_prior(prior, 0.0, std.y_scale)
    return out


def hyper_names(priors: dict) -> list[str]:
    """The sampled hyperparameters, in a fixed order, from the (resolved) prior names."""
    order = ["baseline_mean", "effect_mean", "noise", "noise.control", "noise.treated"]
    first = [name for name in order if name in priors]
    return first + sorted(name for name in priors if name not in order)


def to_original_units(name: str, value: np.ndarray, std: Standardisation, covariates) -> np.ndarray:
    if name == "baseline_mean":
        # α is the mean outcome at the covariates' means; unstandardise both.
        return value * std.y_scale + std.y_shift
    if name.startswith("slope."):
        i = list(covariates).index(name.split(".", 1)[1])
        return value * std.y_scale / std.x_scale[i]
    if name.startswith("correlation."):
        return value
    return value * std.y_scale


def residual_stats(data: CellData, slope):
    """Cell mean and sum of squares of y − βᵀx: r̄ = ȳ − βᵀx̄, M2_r = M2 − 2βᵀSxy + βᵀSxxβ."""
    import jax.numpy as jnp

    resid_mean = data.mean - data.x_mean @ slope
    resid_m2 = data.m2 - 2.0 * data.xy_m2 @ slope + jnp.einsum("i,cij,j->c", slope, data.xx_m2, slope)
    return resid_mean, resid_m2


def cell_noise(noise, arm):
    """σ for each cell: one shared value, or (control, treated) picked by arm."""
    import jax.numpy as jnp

    if jnp.ndim(noise) == 0:
        return noise
    return jnp.where(arm > 0.5, noise[1], noise[0])


def cell_log_likelihood(data: CellData, alpha_leaf, tau_leaf, noise, slope):
    """Σ over cells of the Gaussian log likelihood; padding cells (n = 0) add 0."""
    import jax.numpy as jnp

    mu = alpha_leaf[data.leaf] + tau_leaf[data.leaf] * data.arm
    resid_mean, resid_m2 = residual_stats(data, slope)
    var = cell_noise(noise, data.arm) ** 2
    return jnp.sum(-0.5 * data.n * jnp.log(2 * jnp.pi * var)
                   - (resid_m2 + data.n * (resid_mean - mu) ** 2) / (2 * var))


def _sample_globals(dtype, priors, covariates):
    import jax.numpy as jnp
    import numpyro

    from engine.models import to_numpyro

    alpha = numpyro.sample("baseline_mean", to_numpyro(priors["baseline_mean"]))
    tau = numpyro.sample("effect_mean", to_numpyro(priors["effect_mean"]))
    if "noise" in priors:
        noise = numpyro.sample("noise", to_numpyro(priors["noise"]))
    else:
        noise = jnp.stack([numpyro.sample(f"noise.{arm}", to_numpyro(priors[f"noise.{arm}"]))
                           for arm in ("control", "treated")])
    if covariates:
        slope = jnp.stack([numpyro.sample(f"slope.{c}", to_numpyro(priors[f"slope.{c}"]))
                           for c in covariates])
    else:
        slope = jnp.zeros((0,), dtype=dtype)
    return alpha, tau, noise, slope


def _sample_scales(level, priors):
    """(σ_α, σ_τ, ρ) of one level; ρ = 0 unless the level's effects are correlated."""
    import numpyro

    from engine.models import to_numpyro

    s_alpha = numpyro.sample(f"baseline_scale.{level}", to_numpyro(priors[f"baseline_scale.{level}"]))
    s_tau = numpyro.sample(f"effect_scale.{level}", to_numpyro(priors[f"effect_scale.{level}"]))
    name = f"correlation.{level}"
    rho = numpyro.sample(name, to_numpyro(priors[name])) if name in priors else 0.0 * s_tau
    return s_alpha, s_tau, rho


def collapsed_model(data, parents, *, levels, num_nodes, priors, covariates):
    """The `exact` model: every group's (α, τ) integrated out analytically (MATH.md).

    Only the hyperparameters are sampled; the marginal likelihood comes from
    the Gaussian-tree upward pass, O(cells + nodes) per evaluation. ``data`` is
    a ``CellData`` (rows reduced to cells) or an ``EstimateData`` (one effect
    estimate and standard error per leaf: summary-level input).
    """
    import numpyro

    from kernels import gaussian_tree as tree

    if isinstance(data, EstimateData):
        hyper = {"effect_mean": numpyro.sample("effect_mean", to_numpyro_prior(priors, "effect_mean"))}
        for level in levels:
            hyper[f"effect_scale.{level}"] = numpyro.sample(
                f"effect_scale.{level}", to_numpyro_prior(priors, f"effect_scale.{level}"))
        leaf_j, leaf_h, prior_cov, prior_mean = tree_inputs(data, hyper, levels, covariates, num_nodes)
        upward = tree.integrate(leaf_j, leaf_h, tuple(parents), prior_cov, prior_mean, num_top=num_nodes[0])
        # log N(estimate | τ, se²) = −½ prec (est − τ)² + ½ log(prec / 2π); the τ-terms are in the tree.
        # Padding leaves have precision 0 and contribute nothing (log 0 would be −∞).
        observed = data.precision > 0
        safe = _where(observed, data.precision, 1.0)
        constant = 0.5 * _where(observed, -data.precision * data.estimate**2 + _log(safe / (2 * _pi())), 0.0).sum()
        numpyro.factor("marginal", upward.log_normaliser + constant)
        return
    if not levels:
        return joint_model(data, parents, levels=levels, num_nodes=num_nodes, priors=priors,
                           covariates=covariates)
    alpha, tau, noise, slope = _sample_globals(data.mean.dtype, priors, covariates)
    scales = [_sample_scales(level, priors) for level in levels]
    resid_mean, resid_m2 = residual_stats(data, slope)
    log_marginal, _ = tree.gaussian_log_marginal(
        data.n, resid_mean, resid_m2, data.arm, data.leaf, tuple(parents), level_covariances(scales),
        _stack(alpha, tau), cell_noise(noise, data.arm) ** 2, num_leaves=num_nodes[-1], num_top=num_nodes[0])
    numpyro.factor("marginal", log_marginal)


def one_level_statistics(problem: "Problem"):
    """The problem's cells as leaf configurations (the marginal) and per-leaf arms (the group
    draws), from kernels/configurations.py; None where that route does not apply: more than
    one level, covariates, or summary-level input."""
    from kernels.configurations import one_level

    if len(problem.levels) != 1 or problem.covariates or not isinstance(problem.data, CellData):
        return None
    d = problem.data
    return one_level(np.asarray(d.n), np.asarray(d.mean), np.asarray(d.m2), np.asarray(d.arm), np.asarray(d.leaf),
                     problem.num_nodes[-1], pad_fn=lambda k: bucket(max(k, 1), 8))


def configuration_model(configs, parents, *, levels, num_nodes, priors, covariates):
    """`collapsed_model` for one level without covariates, from leaf configurations.

    The same marginal likelihood (a test checks value and gradient), at O(configurations)
    per gradient instead of O(cells): the leaves sharing rows per arm share their marginal
    covariance, so NUTS never touches the groups. ``parents``, ``num_nodes`` and
    ``covariates`` are unused; they keep the signature of ``collapsed_model``.
    """
    import jax.numpy as jnp
    import numpyro

    from kernels.configurations import configuration_log_marginal

    alpha, tau, noise, _ = _sample_globals(jnp.result_type(configs.both_mean), priors, ())
    scales = [_sample_scales(level, priors) for level in levels]
    numpyro.factor("marginal", configuration_log_marginal(configs, level_covariances(scales), _stack(alpha, tau),
                                                          noise**2))


def tree_inputs(data, hyper: dict, levels, covariates, num_nodes):
    """Leaf information and level priors for one hyperparameter value (standardised units).

    Shared by the collapsed model (upward pass) and the downward pass that draws groups.
    """
    import jax.numpy as jnp

    from kernels import gaussian_tree as tree

    if isinstance(data, EstimateData):
        # The estimate informs τ only; α has no data and integrates to one under any
        # proper prior, so it is fixed at N(0, 1) and never reported.
        zeros = jnp.zeros_like(data.precision)
        leaf_j = jnp.stack([jnp.stack([zeros, zeros], -1), jnp.stack([zeros, data.precision], -1)], -2)
        leaf_h = jnp.stack([zeros, data.precision * data.estimate], -1)
        one = jnp.ones((), dtype=data.estimate.dtype)
        scales = [(one, hyper[f"effect_scale.{lv}"], 0.0 * one) for lv in levels]
        return leaf_j, leaf_h, level_covariances(scales), _stack(0.0 * one, hyper["effect_mean"])
    slope = (jnp.stack([hyper[f"slope.{c}"] for c in covariates]) if covariates
             else jnp.zeros((0,), dtype=data.mean.dtype))
    prior_cov, prior_mean, noise = hyper_prior(hyper, levels)
    resid_mean, _ = residual_stats(data, slope)
    leaf_j, leaf_h = tree.gaussian_leaf_information(data.n, resid_mean, data.arm, data.leaf, num_nodes[-1],
                                                    cell_noise(noise, data.arm) ** 2)
    return leaf_j, leaf_h, prior_cov, prior_mean


def hyper_prior(hyper: dict, levels):
    """(level covariances (L, 2, 2), hyper-mean μ (2,), σ: scalar or (control, treated))."""
    import jax.numpy as jnp

    scales = [(hyper[f"baseline_scale.{lv}"], hyper[f"effect_scale.{lv}"],
               hyper.get(f"correlation.{lv}", 0.0 * hyper[f"effect_scale.{lv}"])) for lv in levels]
    noise = hyper["noise"] if "noise" in hyper else jnp.stack([hyper["noise.control"], hyper["noise.treated"]])
    return level_covariances(scales), _stack(hyper["baseline_mean"], hyper["effect_mean"]), noise


def _stack(a, b):
    import jax.numpy as jnp

    return jnp.stack([jnp.asarray(a), jnp.asarray(b)])


def _where(condition, a, b):
    import jax.numpy as jnp

    return jnp.where(condition, a, b)


def _log(x):
    import jax.numpy as jnp

    return jnp.log(x)


def _pi():
    import math

    return math.pi


def to_numpyro_prior(priors, name):
    from engine.models import to_numpyro

    return to_numpyro(priors[name])


def level_covariances(scales):
    """(L, 2, 2) prior covariances from per-level (σ_α, σ_τ, ρ)."""
    import jax.numpy as jnp

    return jnp.stack([jnp.stack([jnp.stack([s_a**2, rho * s_a * s_t]), jnp.stack([rho * s_a * s_t, s_t**2])])
                      for s_a, s_t, rho in scales])


def joint_model(data, parents, *, levels, num_nodes, priors, covariates):
    """The full joint model, non-centred: every group's (α, τ) is a sampled site.

    The reference the collapsed (`exact`) model is checked against. ``data``
    and ``parents`` are arguments (traced), the rest are static.
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    summary_level = isinstance(data, EstimateData)
    if summary_level:
        tau = jnp.reshape(numpyro.sample("effect_mean", to_numpyro_prior(priors, "effect_mean")), (1,))
        alpha = jnp.zeros((1,), dtype=tau.dtype)
    else:
        alpha, tau, noise, slope = _sample_globals(data.mean.dtype, priors, covariates)
        alpha, tau = jnp.reshape(alpha, (1,)), jnp.reshape(tau, (1,))
    for depth, (level, size) in enumerate(zip(levels, num_nodes)):
        above = jnp.zeros(size, dtype=jnp.int32) if depth == 0 else parents[depth - 1]
        s_tau = numpyro.sample(f"effect_scale.{level}", to_numpyro_prior(priors, f"effect_scale.{level}"))
        z_tau = numpyro.sample(f"effect_z.{level}", dist.Normal(0.0, 1.0).expand([size]).to_event(1))
        if summary_level:
            tau = tau[above] + s_tau * z_tau
        else:
            s_alpha = numpyro.sample(f"baseline_scale.{level}",
                                     to_numpyro_prior(priors, f"baseline_scale.{level}"))
            z_alpha = numpyro.sample(f"baseline_z.{level}", dist.Normal(0.0, 1.0).expand([size]).to_event(1))
            alpha = alpha[above] + s_alpha * z_alpha
            tau = tau[above] + s_tau * _correlated(z_tau, z_alpha, priors, level)
    if summary_level:
        numpyro.factor("estimates", dist.Normal(tau, 1.0 / jnp.sqrt(data.precision)).log_prob(data.estimate).sum())
    else:
        numpyro.factor("cells", cell_log_likelihood(data, alpha, tau, noise, slope))


def _correlated(z_tau, z_alpha, source, level):
    """τ's standardised increment given α's: ρ z_α + √(1 − ρ²) z_τ (the 2×2 Cholesky factor).

    ``source`` maps names to priors (inside the model: ρ is sampled) or to draws.
    """
    import jax.numpy as jnp
    import numpyro

    name = f"correlation.{level}"
    if name not in source:
        return z_tau
    rho = source[name] if not isinstance(source[name], Prior) else numpyro.sample(name, to_numpyro_prior(source, name))
    return rho * z_alpha + jnp.sqrt(1.0 - rho**2) * z_tau


def node_effects(draws: dict, parents, levels, num_nodes):
    """τ of every node at every level from one draw of the joint model (vmap it).

    Returns per level a (nodes,) array in standardised units.
    """
    import jax.numpy as jnp

    tau = jnp.reshape(draws["effect_mean"], (1,))
    out = []
    for depth, (level, size) in enumerate(zip(levels, num_nodes)):
        above = jnp.zeros(size, dtype=jnp.int32) if depth == 0 else parents[depth - 1]
        z_tau = draws[f"effect_z.{level}"]
        if f"baseline_z.{level}" in draws:
            z_tau = _correlated(z_tau, draws[f"baseline_z.{level}"], draws, level)
        tau = tau[above] + draws[f"effect_scale.{level}"] * z_tau
        out.append(tau)
    return out


class Problem(NamedTuple):
    """Everything inference needs, in standardised units, with static sizes explicit."""

    data: CellData
    parents: tuple            # per level 1..L-1: (nodes,) int32
    num_nodes: tuple          # static node counts per level
    levels: tuple
    covariates: tuple
    std_priors: dict          # priors in standardised units
    standardisation: Standardisation
    leaf_rows: np.ndarray     # (padded leaves,) rows per leaf, the ATE weights (0 for padding)
    real_nodes: tuple         # node counts per level before padding


def padded_tree(encoding: Encoding):
    """Node counts bucketed like cell counts, so a new group count rarely changes a shape.

    Padding nodes have no data and no children: in the collapsed model each
    integrates to exactly one (its A equals its prior precision), so the
    marginal likelihood is unchanged; in the joint model they are prior-only
    draws. Their parent is node 0; they are dropped from every output.
    """
    num_nodes = tuple(bucket(n, 8) for n in encoding.num_nodes)
    parents = tuple(np.concatenate([p, np.zeros(num_nodes[depth + 1] - p.shape[0], np.int32)])
                    for depth, p in enumerate(encoding.parents))
    leaf_rows = np.zeros(num_nodes[-1] if num_nodes else 1)
    leaf_rows[: encoding.leaf_rows.shape[0]] = encoding.leaf_rows
    return num_nodes, parents, leaf_rows


def build(cells: Cells, encoding: Encoding, priors: dict[str, Prior], y_mean: float, y_sd: float,
          x_means: dict, x_sds: dict) -> Problem:
    data, std = standardise(cells, encoding, y_mean, y_sd, x_means, x_sds)
    num_nodes, parents, leaf_rows = padded_tree(encoding)
    return Problem(
        data=data, parents=parents, num_nodes=num_nodes,
        levels=tuple(cells.levels), covariates=tuple(cells.covariates),
        std_priors=standardised_priors(priors, std, cells.levels, cells.covariates),
        standardisation=std, leaf_rows=leaf_rows, real_nodes=encoding.num_nodes,
    )


def build_estimates(table, encoding: Encoding, priors: dict[str, Prior], levels) -> Problem:
    """Summary-level input (an estimate and standard error per leaf) as a Problem.

    Effects are scaled by s = sqrt(var(estimate) + mean(stderr²)), not shifted.
    """
    leaf_key = levels[-1]
    ordered = encoding.nodes[-1].select(leaf_key).join(table, on=leaf_key, how="left", maintain_order="left")
    estimate = ordered["estimate"].to_numpy()
    stderr = ordered["stderr"].to_numpy()
    scale = float(np.sqrt(estimate.var() + np.mean(stderr**2))) or 1.0
    std = Standardisation(0.0, scale, np.zeros(0), np.zeros(0))
    std_priors = {"effect_mean": standardise_prior(priors["effect_mean"], 0.0, scale)}
    for lv in levels:
        std_priors[f"effect_scale.{lv}"] = standardise_prior(priors[f"effect_scale.{lv}"], 0.0, scale)
    num_nodes, parents, leaf_rows = padded_tree(encoding)
    pad = num_nodes[-1] - estimate.shape[0]
    # Padding leaves carry no information: precision 0.
    data = EstimateData(estimate=np.concatenate([estimate / scale, np.zeros(pad)]),
                        precision=np.concatenate([(scale / stderr) ** 2, np.zeros(pad)]))
    return Problem(data=data, parents=parents, num_nodes=num_nodes, levels=tuple(levels), covariates=(),
                   std_priors=std_priors, standardisation=std, leaf_rows=leaf_rows,
                   real_nodes=encoding.num_nodes)

