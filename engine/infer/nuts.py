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
    groups = tuple(summarise_draws(d, spec.interval) for d in effect_draws)
    return assemble(problem, spec, method, reason, hyper, groups, ate, divergences, sampler, seconds, named)


def assemble(problem, spec, method, reason, hyper, groups, ate, divergences, sampler, seconds, extra_named=None):
    """New-group effect and diagnostics from draws: shared by every method."""
    rng = np.random.default_rng([spec.seed, 1])
    if problem.levels:
        top = problem.levels[0]
        new_group = hyper["effect_mean"] + hyper[f"effect_scale.{top}"] * rng.standard_normal(ate.shape)
    else:
        new_group = hyper["effect_mean"].copy()
    named = dict(hyper)
    named["ate"] = ate
    named.update(extra_named or {})
    diagnostics = diag.summarise(named, divergences)
    sampler = dict(sampler, devices=runner.devices())
    return Posterior(method=method, method_reason=reason, hyper=hyper, groups=groups,
                     ate=ate, new_group=new_group, diagnostics=diagnostics, sampler=sampler,
                     fit_seconds=seconds)
