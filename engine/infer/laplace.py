"""`laplace`: NUTS over the hyperparameters on the Laplace-approximate marginal likelihood,
then every group's (baseline, effect) drawn from the Gaussian approximation at the mode.

Given the hyperparameters φ the joint log posterior of all groups is concave with a
tree-structured Hessian, so Newton's method to the mode is a few Gaussian-tree solves
and the Laplace approximation is the Gaussian tree's log normaliser (MATH.md, "Binary
and count outcomes"; ``engine.models.glm``). Group draws come from N(θ̂, H⁻¹) by the
downward pass; link-scale summaries are Rao-Blackwellised as in `exact`, outcome-scale
effects (risk or rate differences) are summarised from the draws.

With one grouping level the leaves are independent given the hyperparameters and each
leaf's integral is refined by adaptive Gauss–Hermite quadrature around its mode
(``glm.QUADRATURE_NODES`` per dimension, recorded as ``quadrature_nodes``); nested trees use
the plain Laplace approximation. Accuracy is measured against full NUTS (tests/statistical).
"""
from __future__ import annotations

import time
from functools import lru_cache, partial

import numpy as np

from engine.infer import Posterior, downward, runner
from engine.infer.nuts import assemble, fit_glm_nuts
from engine.infer.summaries import interval_rule
from engine.models import glm


def one_draw(rng_key, hyper: dict, data, parents, leaf_rows, *, levels, num_nodes, link, covariates):
    import jax.numpy as jnp

    from kernels import gaussian_tree as tree

    prior_cov, prior_mean = glm.tree_prior(hyper, levels)
    slope = glm.slope_vector(hyper, covariates)
    upward, _, _ = glm.laplace_upward(data, parents, prior_cov, prior_mean, link=link, num_nodes=num_nodes,
                                      slope=slope)
    draws = tree.sample(rng_key, upward, parents, prior_cov, prior_mean)
    outcome, ate = glm.outcome_effects(draws[-1], leaf_rows, parents, num_nodes, link,
                                       cells=glm.effect_cells(data, slope))
    ate_link = jnp.sum(draws[-1][:, 1] * leaf_rows) / jnp.sum(leaf_rows)
    return downward.DrawOut(downward.link_summaries(draws, upward, parents, prior_cov, prior_mean),
                            outcome, ate, ate_link)


def fit_laplace(problem, spec, method_reason: str) -> Posterior:
    import jax.numpy as jnp

    levels, link, covariates = tuple(problem.levels), glm.link_of(spec.family), tuple(problem.covariates)
    if not levels:
        # One population: two parameters and nothing to integrate; the joint model is exact.
        return fit_glm_nuts(problem, spec, method_reason + " (no groups: the joint model has only "
                            "(baseline, effect), sampled directly)", method="laplace")
    runner.configure_jax()
    start = time.perf_counter()
    model = partial(glm.laplace_model, levels=levels, num_nodes=problem.num_nodes, priors=problem.std_priors,
                    link=link, covariates=covariates)
    names = glm.hyper_names(problem.std_priors)
    run = downward.sample_hyper(model, problem, spec, names)
    samples, divergences, sampler, flat = run.samples, run.divergences, run.sampler, run.flat
    data, parents, draw_key = run.data, run.parents, run.draw_key
    chains, draws = np.asarray(samples["effect_mean"]).shape
    draw = partial(one_draw, levels=levels, num_nodes=problem.num_nodes, link=link, covariates=covariates)
    result = downward.summarise(draw, flat, (data, parents, jnp.asarray(problem.leaf_rows)),
                                rng_key=draw_key, num_nodes=problem.num_nodes, real_nodes=problem.real_nodes,
                                interval=spec.interval, keep=spec.keep_draws)
    hyper = glm.original_units(problem, samples)
    steps = newton_steps(flat, data, parents, levels=levels, num_nodes=problem.num_nodes, link=link,
                          covariates=covariates)
    sampler = dict(sampler, downward_s=result.seconds, downward_batch=result.batch,
                   quantile_draws=result.outcome[0].quantile_draws,
                   group_intervals=interval_rule(result.outcome[0].quantile_draws, spec.interval),
                   quadrature_nodes=glm.quadrature_nodes(problem.data),
                   quadrature_leaves=glm.small_leaves(problem.data), newton_tolerance=glm.NEWTON_TOL,
                   newton_steps_max=steps)
    posterior = assemble(problem, spec, "laplace", method_reason, hyper, result.outcome,
                         result.ate.reshape(chains, draws), divergences, sampler, time.perf_counter() - start,
                         link_groups=result.link, ate_link=result.ate_link.reshape(chains, draws))
    if steps >= glm.NEWTON_MAX_STEPS:
        posterior.diagnostics["ok"] = False
        posterior.diagnostics["messages"].append(newton_steps_message())
    return posterior


def newton_steps_message() -> str:
    return (f"Newton's method did not reach the groups' joint mode within {glm.NEWTON_MAX_STEPS} steps at "
            "some hyperparameter draws: the Laplace approximation there is unreliable; check the data "
            "for separation (groups with all or no events and huge counts) or use --method nuts")


CHECKED_DRAWS = 64


def newton_steps(flat: dict, data, parents, *, levels, num_nodes, link, covariates) -> int:
    """The most Newton steps any of ``CHECKED_DRAWS`` evenly spaced hyperparameter draws needed."""
    import jax.numpy as jnp

    total = next(iter(flat.values())).shape[0]
    index = np.unique(np.linspace(0, total - 1, min(CHECKED_DRAWS, total)).astype(int))
    batch = {name: jnp.asarray(values[index]) for name, values in flat.items()}
    return int(_compiled_steps(levels, num_nodes, link, covariates)(batch, data, parents).max())


@lru_cache(maxsize=16)
def _compiled_steps(levels, num_nodes, link, covariates):
    import jax

    def steps(hyper, data, parents):
        prior_cov, prior_mean = glm.tree_prior(hyper, levels)
        return glm.laplace_mode(data, parents, prior_cov, prior_mean, link=link, num_nodes=num_nodes,
                                slope=glm.slope_vector(hyper, covariates))[1]

    return jax.jit(jax.vmap(steps, in_axes=(0, None, None)))
