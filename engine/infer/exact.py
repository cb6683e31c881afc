"""`exact`: NUTS over the hyperparameters on the exact marginal likelihood, then
every group's (baseline, effect) drawn from its exact conditional, down the tree.

Cost per gradient O(cells + nodes); no per-group parameter enters the sampler.
Group summaries are Rao-Blackwellised: each posterior draw of the
hyperparameters contributes the conditional mean, variance and P(τ > 0) of
every group given its drawn parent, not only one noisy draw. With one level and no
covariates (the long-tail case) both halves go through leaf configurations
(kernels/configurations.py): the marginal costs O(configurations) per gradient, and
every group's mean and sd O(configurations) per draw plus O(groups) once.
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np

from engine.infer import Posterior, downward, runner
from engine.infer.nuts import assemble
from engine.infer.summaries import interval_rule
from engine.models import gaussian
from kernels.configurations import configuration_count


def _one_draw(rng_key, hyper: dict, data, parents, leaf_weights, *, levels, num_nodes, covariates):
    """One joint draw of every node given one hyperparameter draw (standardised units)."""
    import jax.numpy as jnp

    from kernels import gaussian_tree as tree

    leaf_j, leaf_h, prior_cov, prior_mean = gaussian.tree_inputs(data, hyper, levels, covariates, num_nodes)
    upward = tree.integrate(leaf_j, leaf_h, parents, prior_cov, prior_mean, num_top=num_nodes[0])
    draws = tree.sample(rng_key, upward, parents, prior_cov, prior_mean)
    ate = jnp.dot(draws[-1][:, 1], leaf_weights)
    return downward.DrawOut(downward.link_summaries(draws, upward, parents, prior_cov, prior_mean), [], ate, ate)


def _leaf_prior(hyper: dict, *, levels):
    """``(Σ, μ, σ²)`` of one hyperparameter draw, for ``downward.summarise_leaves``."""
    prior_cov, prior_mean, noise = gaussian.hyper_prior(hyper, levels)
    return prior_cov, prior_mean, noise**2


def fit_exact(problem, spec, method_reason: str) -> Posterior:
    import jax.numpy as jnp

    runner.configure_jax()
    start = time.perf_counter()
    levels, covs = tuple(problem.levels), tuple(problem.covariates)
    if not levels:
        # No grouping: no latent group effects to integrate; the collapsed model is the joint one.
        from engine.infer.nuts import fit_nuts
        posterior = fit_nuts(problem, spec, method_reason)
        return Posterior(**{**posterior.__dict__, "method": "exact"})
    one_level = gaussian.one_level_statistics(problem)
    configs, arms = one_level if one_level else (None, None)
    model_fn = gaussian.collapsed_model if configs is None else gaussian.configuration_model
    model = partial(model_fn, levels=levels, num_nodes=problem.num_nodes, priors=problem.std_priors,
                    covariates=covs)
    names = gaussian.hyper_names(problem.std_priors)
    run = downward.sample_hyper(model, problem, spec, names, model_data=configs)
    samples, divergences, sampler, flat = run.samples, run.divergences, run.sampler, run.flat
    data, parents, draw_key = run.data, run.parents, run.draw_key
    chains, draws = np.asarray(samples["effect_mean"]).shape

    weights = problem.leaf_rows / problem.leaf_rows.sum()
    if configs is None:
        one_draw = partial(_one_draw, levels=levels, num_nodes=problem.num_nodes, covariates=covs)
        result = downward.summarise(one_draw, flat, (data, parents, jnp.asarray(weights)), rng_key=draw_key,
                                    num_nodes=problem.num_nodes, real_nodes=problem.real_nodes,
                                    interval=spec.interval, scale=problem.standardisation.y_scale,
                                    keep=spec.keep_draws)
    else:
        result = downward.summarise_leaves(partial(_leaf_prior, levels=levels), flat, arms, weights,
                                           rng_key=draw_key, real_nodes=problem.real_nodes[0],
                                           interval=spec.interval, scale=problem.standardisation.y_scale,
                                           keep=spec.keep_draws)
    groups, ate, batch = result.link, result.ate, result.batch
    std = problem.standardisation
    hyper = {name: gaussian.to_original_units(name, np.asarray(samples[name]), std, covs) for name in names}
    marginal = ("Gaussian tree over cells" if configs is None else
                f"leaf configurations ({configuration_count(configs)} of them)")
    sampler = dict(sampler, marginal=marginal, downward_s=result.seconds, downward_batch=batch,
                   quantile_draws=groups[0].quantile_draws,
                   group_intervals=interval_rule(groups[0].quantile_draws, spec.interval))
    if result.exact_positive >= 0:
        # Leaves whose P(τ > 0) is the exact mean over draws; the rest are the expansion's,
        # within downward.EXPANSION_TOLERANCE by their computed bound.
        sampler["prob_positive_exact_groups"] = result.exact_positive
        sampler["prob_positive_tolerance"] = downward.EXPANSION_TOLERANCE
    return assemble(problem, spec, "exact", method_reason, hyper, groups, ate.reshape(chains, draws),
                    divergences, sampler, time.perf_counter() - start)
