"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018).

Draw hyperparameters from the prior, group effects from the hierarchy and cell
statistics from the likelihood; fit; record the rank of each true value among
thinned posterior draws. If the method samples the true posterior, every rank
is uniform; a χ² test over rank bins gives a p-value per parameter.

The simulated problems keep one fixed tree and cell layout, so every
replication reuses the compiled sampler; the model runs in unstandardised
units with fixed priors (those that generated the data), as SBC requires.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from engine.models import gaussian
from engine.priors import Prior

SBC_PRIORS = {
    "baseline_mean": Prior("normal", (0.0, 1.0)),
    "effect_mean": Prior("normal", (0.0, 1.0)),
    "noise": Prior("halfnormal", (1.0,)),
}
LEVEL_PRIORS = {"baseline_scale": Prior("halfnormal", (1.0,)), "effect_scale": Prior("halfnormal", (0.5,))}
# Bernoulli (logit link): base rates mostly 5%–50%, log odds ratios mostly within ±1.
GLM_SBC_PRIORS = {
    "baseline_mean": Prior("normal", (-1.5, 0.5)),
    "effect_mean": Prior("normal", (0.0, 0.5)),
}
GLM_LEVEL_PRIORS = {"baseline_scale": Prior("halfnormal", (0.5,)), "effect_scale": Prior("halfnormal", (0.5,))}
# Tests set this to fit with priors other than the generating ones (a power check: SBC must fail).
FIT_PRIORS_OVERRIDE: dict | None = None


@dataclass(frozen=True)
class Calibration:
    method: str
    replications: int
    ranks: dict          # parameter -> (replications,) int ranks in 0..thinned_draws
    thinned_draws: int
    bins: int
    p_values: dict       # parameter -> χ² uniformity p-value
    seconds: float

    @property
    def ok(self) -> bool:
        """No parameter rejects uniformity at 1%, Bonferroni-corrected over parameters."""
        return min(self.p_values.values()) > 0.01 / len(self.p_values)

    def histograms(self) -> dict:
        return {name: np.bincount(_binned(r, self.thinned_draws, self.bins), minlength=self.bins).tolist()
                for name, r in self.ranks.items()}

    def as_dict(self) -> dict:
        return {"method": self.method, "replications": self.replications, "thinned_draws": self.thinned_draws,
                "bins": self.bins, "p_values": self.p_values, "histograms": self.histograms(), "ok": self.ok,
                "seconds": round(self.seconds, 2)}


def _binned(ranks: np.ndarray, thinned: int, bins: int) -> np.ndarray:
    return np.minimum(ranks * bins // (thinned + 1), bins - 1)


def chi2_uniformity(ranks: np.ndarray, thinned: int, bins: int) -> float:
    """p-value of a χ² test that ranks in 0..thinned are uniform over ``bins`` equal bins."""
    from jax.scipy.special import gammaincc

    counts = np.bincount(_binned(ranks, thinned, bins), minlength=bins)
    # Equal bins only when (thinned + 1) divides evenly; use the exact expected counts otherwise.
    edges = np.arange(thinned + 1)
    expected = np.bincount(_binned(edges, thinned, bins), minlength=bins) / (thinned + 1) * len(ranks)
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return float(gammaincc((bins - 1) / 2.0, statistic / 2.0))


def _draw(rng, prior: Prior, size=None):
    f, a = prior.family, prior.args
    if f == "normal":
        return rng.normal(a[0], a[1], size)
    if f == "halfnormal":
        return np.abs(rng.normal(0.0, a[0], size))
    raise ValueError(f)


def _layout(groups: int, levels: int, rows: int, rng):
    """A fixed tree and long-tail cell layout, the same for every replication."""
    from engine.simulate import _level_sizes

    sizes = _level_sizes(groups, levels)
    parents = []
    for depth in range(1, levels):
        above = sizes[depth - 1]
        parents.append(rng.permutation(np.concatenate([np.arange(above),
                                                       rng.integers(0, above, sizes[depth] - above)])).astype(np.int32))
    weights = 1.0 / np.arange(1, groups + 1) ** 1.1
    leaf_n = 1 + rng.multinomial(rows - groups, rng.permutation(weights / weights.sum()))
    treated = rng.binomial(leaf_n, 0.5)
    n = np.stack([leaf_n - treated, treated], axis=1).reshape(-1)
    leaf = np.repeat(np.arange(groups), 2).astype(np.int32)
    arm = np.tile([0.0, 1.0], groups)
    keep = n > 0
    return sizes, tuple(parents), n[keep].astype(np.float64), leaf[keep], arm[keep]


def _simulate_latents(rng, sizes, parents, level_names, top_priors, level_priors):
    truth = {name: _draw(rng, prior) for name, prior in top_priors.items()}
    alpha, tau = np.array([truth["baseline_mean"]]), np.array([truth["effect_mean"]])
    for depth, (name, size) in enumerate(zip(level_names, sizes)):
        s_alpha, s_tau = _draw(rng, level_priors["baseline_scale"]), _draw(rng, level_priors["effect_scale"])
        truth[f"baseline_scale.{name}"], truth[f"effect_scale.{name}"] = s_alpha, s_tau
        above = np.zeros(size, np.int64) if depth == 0 else parents[depth - 1]
        alpha = alpha[above] + s_alpha * rng.standard_normal(size)
        tau = tau[above] + s_tau * rng.standard_normal(size)
    return truth, alpha, tau


def _simulate_bernoulli_cells(rng, sizes, parents, n, leaf, arm, level_names):
    truth, alpha, tau = _simulate_latents(rng, sizes, parents, level_names, GLM_SBC_PRIORS, GLM_LEVEL_PRIORS)
    eta = alpha[leaf] + tau[leaf] * arm
    successes = rng.binomial(n.astype(np.int64), 1 / (1 + np.exp(-eta))).astype(np.float64)
    leaf_rows = np.bincount(leaf, weights=n, minlength=sizes[-1])
    effect = 1 / (1 + np.exp(-(alpha + tau))) - 1 / (1 + np.exp(-alpha))
    truth["ate"] = float(np.dot(effect, leaf_rows) / leaf_rows.sum())
    return truth, successes, leaf_rows


def _simulate_cells(rng, sizes, parents, n, leaf, arm, level_names):
    truth, alpha, tau = _simulate_latents(rng, sizes, parents, level_names, SBC_PRIORS, LEVEL_PRIORS)
    sigma = truth["noise"]
    mu = alpha[leaf] + tau[leaf] * arm
    mean = rng.normal(mu, sigma / np.sqrt(n))
    m2 = sigma**2 * rng.chisquare(np.maximum(n - 1, 1)) * (n > 1)
    leaf_rows = np.bincount(leaf, weights=n, minlength=sizes[-1])
    truth["ate"] = float(np.dot(tau, leaf_rows) / leaf_rows.sum())
    return truth, mean, m2, leaf_rows


def run_sbc(method: str = "exact", groups: int = 40, levels: int = 1, rows: int = 200, replications: int = 100,
            draws: int = 200, warmup: int = 300, chains: int = 2, thinned: int = 19, bins: int = 5, seed: int = 0,
            progress_fn=None) -> Calibration:
    """Run SBC for ``method`` on a fixed-size problem; see the module docstring.

    ``exact`` and ``nuts`` fit Gaussian cells; ``laplace`` fits Bernoulli cells (logit link).
    """
    from engine.spec import Spec

    glm_family = method == "laplace"
    rng = np.random.default_rng(seed)
    level_names = tuple(f"level{d + 1}" for d in range(levels))
    sizes, parents, n, leaf, arm = _layout(groups, levels, rows, rng)
    size = n.shape[0]
    padded = gaussian.bucket(size)
    num_nodes = tuple(gaussian.bucket(s, 8) for s in sizes)
    pad_parents = tuple(np.concatenate([p, np.zeros(num_nodes[d + 1] - p.shape[0], np.int32)])
                        for d, p in enumerate(parents))
    top_priors, level_priors = (GLM_SBC_PRIORS, GLM_LEVEL_PRIORS) if glm_family else (SBC_PRIORS, LEVEL_PRIORS)
    priors = dict(top_priors)
    for name in level_names:
        priors[f"baseline_scale.{name}"] = level_priors["baseline_scale"]
        priors[f"effect_scale.{name}"] = level_priors["effect_scale"]
    priors.update(FIT_PRIORS_OVERRIDE or {})
    spec = Spec(outcome="y", treatment="t", groups=level_names, method=method, draws=draws, warmup=warmup,
                chains=chains, seed=seed, family="bernoulli" if glm_family else "gaussian")

    def pad(values, dtype=np.float64):
        out = np.zeros(padded, dtype=dtype)
        out[:size] = values
        return out

    def cell_data():
        """One replication: the truth, the simulated cells, and rows per leaf."""
        if glm_family:
            from engine.models import glm
            truth, successes, leaf_rows = _simulate_bernoulli_cells(rng, sizes, parents, n, leaf, arm, level_names)
            init = np.zeros((num_nodes[-1], 2))
            init[:, 0] = GLM_SBC_PRIORS["baseline_mean"].args[0]
            leaf_successes = glm.per_leaf_arm(successes, arm, leaf, num_nodes[-1])
            leaf_size = glm.per_leaf_arm(n, arm, leaf, num_nodes[-1])
            data = glm.GLMData(successes=pad(successes), size=pad(n), arm=pad(arm), leaf=pad(leaf, np.int32),
                               init=init, leaf_successes=leaf_successes, leaf_size=leaf_size,
                               **glm.quadrature_table("logit", leaf_successes, leaf_size, init, levels,
                                                      rows=num_nodes[-1]))
            return truth, data, leaf_rows
        truth, mean, m2, leaf_rows = _simulate_cells(rng, sizes, parents, n, leaf, arm, level_names)
        data = gaussian.CellData(n=pad(n), mean=pad(mean), m2=pad(m2), arm=pad(arm), leaf=pad(leaf, np.int32),
                                 x_mean=np.zeros((padded, 0)), xy_m2=np.zeros((padded, 0)),
                                 xx_m2=np.zeros((padded, 0, 0)))
        return truth, data, leaf_rows

    fit_fn = _fit_function(method)
    ranks: dict[str, list[int]] = {}
    started = time.perf_counter()
    for r in range(replications):
        truth, data, leaf_rows = cell_data()
        rows_padded = np.zeros(num_nodes[-1])
        rows_padded[: sizes[-1]] = leaf_rows
        problem = gaussian.Problem(
            data=data, parents=pad_parents, num_nodes=num_nodes, levels=level_names, covariates=(),
            std_priors=priors, standardisation=gaussian.Standardisation(0.0, 1.0, np.zeros(0), np.zeros(0)),
            leaf_rows=rows_padded, real_nodes=tuple(sizes))
        posterior = fit_fn(problem, replace(spec, seed=seed + r + 1), "calibration")
        _record_ranks(ranks, truth, dict(posterior.hyper, ate=posterior.ate), thinned)
        if progress_fn is not None:
            progress_fn(r + 1, replications)
    rank_arrays = {k: np.asarray(v) for k, v in ranks.items()}
    p_values = {k: chi2_uniformity(v, thinned, bins) for k, v in rank_arrays.items()}
    return Calibration(method, replications, rank_arrays, thinned, bins, p_values,
                       time.perf_counter() - started)


def _fit_function(method: str):
    if method == "exact":
        from engine.infer.exact import fit_exact
        return fit_exact
    if method == "laplace":
        from engine.infer.laplace import fit_laplace
        return fit_laplace
    from engine.infer.nuts import fit_nuts
    return fit_nuts


def _record_ranks(ranks: dict, truth: dict, named: dict, thinned: int) -> None:
    """Append each true value's rank among ``thinned`` evenly spaced posterior draws."""
    for name, value in truth.items():
        draws_flat = np.asarray(named[name]).reshape(-1)
        # Thin to reduce autocorrelation, as Talts et al. recommend.
        kept = draws_flat[np.linspace(0, draws_flat.size - 1, thinned).astype(int)]
        ranks.setdefault(name, []).append(int((kept < value).sum()))
