"""`exact`: NUTS over the hyperparameters on the exact marginal likelihood, then
every group's (baseline, effect) drawn from its exact conditional, down the tree.

Cost per gradient O(cells + nodes); no per-group parameter enters the sampler.
Group summaries are Rao-Blackwellised: each posterior draw of the
hyperparameters contributes the conditional mean, variance and P(τ > 0) of
every group given its drawn parent, not only one noisy draw.
"""
from __future__ import annotations

import time
from functools import lru_cache, partial

import numpy as np

from engine.infer import Posterior, runner
from engine.infer.nuts import assemble
from engine.infer.summaries import Accumulator, retained_stride
from engine.models import gaussian

# Device memory for one batch of downward passes (draws × nodes × a few 2-vectors).
BATCH_BYTES = 64 * 2**20


def _downward(rng_key, hyper: dict, data, parents, leaf_weights, *, levels, num_nodes, covariates):
    """One joint draw of every node given one hyperparameter draw (standardised units).

    Returns per level (τ draw, E[τ | parent, data], Var[τ | parent, data]) and the draw's ATE.
    """
    import jax.numpy as jnp

    from kernels import gaussian_tree as tree

    leaf_j, leaf_h, prior_cov, prior_mean = gaussian.tree_inputs(data, hyper, levels, covariates, num_nodes)
    upward = tree.integrate(leaf_j, leaf_h, parents, prior_cov, prior_mean, num_top=num_nodes[0])
    draws = tree.sample(rng_key, upward, parents, prior_cov, prior_mean)
    cond_means = tree.conditional_mean(draws, upward, parents, prior_cov, prior_mean)
    out = []
    for draw, cond_mean, precision in zip(draws, cond_means, upward.precision):
        # Var[τ | parent, data] = (A⁻¹)₁₁ = A₀₀ / det A.
        det = precision[:, 0, 0] * precision[:, 1, 1] - precision[:, 0, 1] * precision[:, 1, 0]
        out.append((draw[:, 1], cond_mean[:, 1], precision[:, 0, 0] / det))
    ate = jnp.dot(draws[-1][:, 1], leaf_weights)
    return out, ate


def _batch_sums(rng_keys, hyper_batch, mask, data, parents, leaf_weights, *, levels, num_nodes, covariates):
    """vmap of `_downward` over a batch of hyperparameter draws, reduced to sums per node.

    ``mask`` (B,) is 0 for the repeated draws that pad the last batch to the compiled size.
    """
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import ndtr

    one = partial(_downward, levels=levels, num_nodes=num_nodes, covariates=covariates)
    per_level, ate = jax.vmap(one, in_axes=(0, 0, None, None, None))(rng_keys, hyper_batch, data, parents,
                                                                       leaf_weights)
    sums = []
    for draw, mean, var in per_level:
        w = mask[:, None]
        sums.append((draw, (w * mean).sum(0), (w * (var + mean**2)).sum(0),
                     (w * ndtr(mean / jnp.sqrt(var))).sum(0)))
    return sums, ate


@lru_cache(maxsize=16)
def _compiled_batch_sums(levels, num_nodes, covariates):
    import jax

    return jax.jit(partial(_batch_sums, levels=levels, num_nodes=num_nodes, covariates=covariates))


def fit_exact(problem, spec, method_reason: str) -> Posterior:
    import jax
    import jax.numpy as jnp

    runner.configure_jax()
    start = time.perf_counter()
    levels, covs = tuple(problem.levels), tuple(problem.covariates)
    if not levels:
        # No grouping: no latent group effects to integrate; the collapsed model is the joint one.
        from engine.infer.nuts import fit_nuts
        posterior = fit_nuts(problem, spec, method_reason)
        return Posterior(**{**posterior.__dict__, "method": "exact"})
    model = partial(gaussian.collapsed_model, levels=levels, num_nodes=problem.num_nodes,
                    priors=problem.std_priors, covariates=covs)
    data = jax.tree.map(jnp.asarray, problem.data)
    parents = tuple(jnp.asarray(p) for p in problem.parents)
    hyper_key, draw_key = jax.random.split(jax.random.PRNGKey(spec.seed))
    samples, divergences, sampler = runner.run_nuts(
        model, (data, parents), {}, rng_key=hyper_key, warmup=spec.warmup, draws=spec.draws,
        chains=spec.chains)
    names = gaussian.hyper_names(problem.std_priors)
    chains, draws = np.asarray(samples["effect_mean"]).shape
    flat = {name: np.asarray(samples[name]).reshape(-1) for name in names}
    total = chains * draws

    total_nodes = int(sum(problem.num_nodes))
    batch = int(np.clip(BATCH_BYTES // (8 * 8 * max(total_nodes, 1)), 1, 256))
    batch = min(batch, total)
    stride = retained_stride(total, total_nodes)
    accumulators = [Accumulator(n, stride) for n in problem.num_nodes]
    weights = jnp.asarray(problem.leaf_rows / problem.leaf_rows.sum())
    batch_fn = _compiled_batch_sums(levels, problem.num_nodes, covs)
    keys = jax.random.split(draw_key, total)
    scale = problem.standardisation.y_scale
    ate = np.empty(total)
    for first in range(0, total, batch):
        index = np.minimum(np.arange(first, first + batch), total - 1)  # pad the last batch by repetition
        used = min(batch, total - first)
        hyper_batch = {name: jnp.asarray(values[index]) for name, values in flat.items()}
        mask = jnp.asarray(np.arange(batch) < used, dtype=weights.dtype)
        sums, batch_ate = batch_fn(keys[index], hyper_batch, mask, data, parents, weights)
        ate[first:first + used] = np.asarray(batch_ate[:used]) * scale
        for acc, (draw, mean_sum, second_sum, pos_sum) in zip(accumulators, sums):
            acc.add_sums(np.asarray(draw[:used]) * scale, np.asarray(mean_sum) * scale,
                         np.asarray(second_sum) * scale**2, np.asarray(pos_sum))
    groups = tuple(acc.finish(spec.interval).first(n) for acc, n in zip(accumulators, problem.real_nodes))
    std = problem.standardisation
    hyper = {name: gaussian.to_original_units(name, np.asarray(samples[name]), std, covs) for name in names}
    sampler = dict(sampler, downward_batch=batch, quantile_draws=groups[0].quantile_draws)
    return assemble(problem, spec, "exact", method_reason, hyper, groups, ate.reshape(chains, draws),
                    divergences, sampler, time.perf_counter() - start)
