"""`nuts`: the full joint model, every group effect sampled. The reference method."""
from __future__ import annotations

import time
from functools import partial

import numpy as np

from engine.infer import Posterior
from engine.infer import diagnostics as diag
from engine.infer import runner
from engine.infer.summaries import summarise_draws
from engine.models import gaussian


def fit_nuts(problem, spec, method_reason: str) -> Posterior:
    import jax
    import jax.numpy as jnp

    if spec.family != "gaussian":
        return fit_glm_nuts(problem, spec, method_reason)
    runner.configure_jax()
    start = time.perf_counter()
    levels, covs = list(problem.levels), list(problem.covariates)
    model = partial(gaussian.joint_model, levels=tuple(levels), num_nodes=problem.num_nodes,
                    priors=problem.std_priors, covariates=tuple(covs))
    data = jax.tree.map(jnp.asarray, problem.data)
    parents = tuple(jnp.asarray(p) for p in problem.parents)
    rng_key = jax.random.PRNGKey(spec.seed)
    samples, divergences, sampler = runner.run_nuts(
        model, (data, parents), {}, rng_key=rng_key, warmup=spec.warmup, draws=spec.draws,
        chains=spec.chains)
    std = problem.standardisation
    names = gaussian.hyper_names(problem.std_priors)
    hyper = {name: np.asarray(gaussian.to_original_units(name, np.asarray(samples[name]), std, covs))
             for name in names}

    per_draw = jax.vmap(jax.vmap(partial(gaussian.node_effects, parents=parents, levels=levels,
                                         num_nodes=problem.num_nodes)))
    nodes = per_draw({k: v for k, v in samples.items()})
    effect_draws = tuple(np.asarray(tau)[..., :n] * std.y_scale for tau, n in zip(nodes, problem.real_nodes))
    leaf_tau = np.asarray(nodes[-1]) * std.y_scale if levels else np.asarray(samples["effect_mean"])[..., None] * std.y_scale
    return _assemble(problem, spec, "nuts", method_reason, hyper, effect_draws, leaf_tau,
                     divergences, sampler, time.perf_counter() - start)


def _assemble(problem, spec, method, reason, hyper, effect_draws, leaf_tau, divergences, sampler, seconds):
    weights = problem.leaf_rows / problem.leaf_rows.sum()
    ate = np.tensordot(leaf_tau, weights, axes=([-1], [0]))
    named = {f"effect[{level}]": draws for level, draws in zip(problem.levels, effect_draws)}
    groups = tuple(summarise_draws(d, spec.interval, spec.keep_draws) for d in effect_draws)
    return assemble(problem, spec, method, reason, hyper, groups, ate, divergences, sampler, seconds, named)


def assemble(problem, spec, method, reason, hyper, groups, ate, divergences, sampler, seconds, extra_named=None,
             **glm_fields):
    """New-group effect and diagnostics from draws: shared by every method.

    ``glm_fields``: ``link_groups``, ``ate_link`` and ``new_group_link`` of a GLM fit,
    whose ``new_group`` (outcome scale) then comes from the hyperparameter draws here.
    """
    rng = np.random.default_rng([spec.seed, 1])
    if glm_fields:
        from engine.models import glm
        new_group, glm_fields["new_group_link"] = glm.new_group_effects(hyper, problem.levels,
                                                                        glm.link_of(spec.family), rng)
    elif problem.levels:
        top = problem.levels[0]
        new_group = hyper["effect_mean"] + hyper[f"effect_scale.{top}"] * rng.standard_normal(ate.shape)
    else:
        new_group = hyper["effect_mean"].copy()
    named = dict(hyper)
    named["ate"] = ate
    if glm_fields.get("ate_link") is not None:
        named["ate_link"] = glm_fields["ate_link"]
    named.update(extra_named or {})
    diagnostics = diag.summarise(named, divergences)
    sampler = dict(sampler, devices=runner.devices())
    return Posterior(method=method, method_reason=reason, hyper=hyper, groups=groups,
                     ate=ate, new_group=new_group, diagnostics=diagnostics, sampler=sampler,
                     fit_seconds=seconds, **glm_fields)


def fit_glm_nuts(problem, spec, method_reason: str, method: str = "nuts") -> Posterior:
    """The full joint GLM (every group's (α, τ) sampled), summarised on both scales."""
    import jax
    import jax.numpy as jnp

    from engine.models import glm

    runner.configure_jax()
    start = time.perf_counter()
    levels, link = tuple(problem.levels), glm.link_of(spec.family)
    covariates = tuple(problem.covariates)
    model = partial(glm.joint_model, levels=levels, num_nodes=problem.num_nodes, priors=problem.std_priors,
                    link=link, covariates=covariates)
    data = jax.tree.map(jnp.asarray, problem.data)
    parents = tuple(jnp.asarray(p) for p in problem.parents)
    samples, divergences, sampler = runner.run_nuts(
        model, (data, parents), {}, rng_key=jax.random.PRNGKey(spec.seed), warmup=spec.warmup,
        draws=spec.draws, chains=spec.chains)
    hyper = glm.original_units(problem, samples)
    leaf_rows = jnp.asarray(problem.leaf_rows)
    if levels:
        latents = jax.vmap(jax.vmap(partial(glm.node_latents, parents=parents, levels=levels,
                                            num_nodes=problem.num_nodes)))(samples)
        leaf_theta = latents[-1]
    else:
        leaf_theta = jnp.stack([samples["baseline_mean"], samples["effect_mean"]], -1)[..., None, :]
    def one_draw(theta, draw):
        return glm.outcome_effects(theta, leaf_rows, parents, problem.num_nodes or (1,), link,
                                   cells=glm.effect_cells(data, glm.slope_vector(draw, covariates)))

    outcome, ate = jax.vmap(jax.vmap(one_draw))(leaf_theta, samples)
    ate_link = np.tensordot(np.asarray(leaf_theta[..., 1]), problem.leaf_rows / problem.leaf_rows.sum(),
                            axes=([-1], [0]))
    real = problem.real_nodes
    link_draws = tuple(np.asarray(latents[d][..., 1])[..., :n] for d, n in enumerate(real)) if levels else ()
    outcome_draws = tuple(np.asarray(o)[..., :n] for o, n in zip(outcome, real)) if levels else ()
    named = {f"effect[{level}]": draws for level, draws in zip(levels, link_draws)}
    return assemble(problem, spec, method, method_reason, hyper,
                    tuple(summarise_draws(d, spec.interval, spec.keep_draws) for d in outcome_draws), np.asarray(ate),
                    divergences, sampler, time.perf_counter() - start, named,
                    link_groups=tuple(summarise_draws(d, spec.interval, spec.keep_draws) for d in link_draws),
                    ate_link=ate_link)
