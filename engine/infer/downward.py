"""Group summaries from hyperparameter draws: one downward pass per draw, in batches.

Shared by `exact` and `laplace`. For each posterior draw of the hyperparameters a
method-specific ``one_draw`` function returns, per level, a joint draw of every
node's effect on the link scale with its conditional mean and variance given the
drawn parent (for Rao-Blackwellised sums), optionally per-level draws of the effect
on the outcome scale (GLMs), and the draw's ATE. Batches of draws run as one
compiled ``vmap``; only per-node sums and a thinned subset of draws come back, so
no (draws × groups) array is ever held (summaries.py).
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import NamedTuple

import numpy as np

from engine.infer.summaries import Accumulator, retained_stride

# Device memory for one batch of downward passes (draws × nodes × a few 2-vectors).
BATCH_BYTES = 64 * 2**20


class DrawOut(NamedTuple):
    """What ``one_draw`` returns for one hyperparameter draw."""

    link: list              # per level (draw, E[τ | parent, data], Var[τ | parent, data]), each (nodes,)
    outcome: list           # per level (nodes,) outcome-scale effect draws; [] when the link is the identity
    ate: object             # scalar: the draw's ATE on the outcome scale
    ate_link: object        # scalar: the draw's ATE on the link scale (same as ate for the identity)


class HyperDraws(NamedTuple):
    """NUTS over the hyperparameters of a collapsed model, ready for ``summarise``."""

    samples: dict           # name -> (chains, draws)
    flat: dict              # name -> (chains × draws,) for the sampled hyperparameter names
    divergences: int
    sampler: dict
    data: object            # the problem's data and parents as device arrays
    parents: tuple
    draw_key: object        # the PRNG key for the downward passes


def sample_hyper(model, problem, spec, names) -> HyperDraws:
    """Run NUTS on ``model(data, parents)`` (data as traced arguments) and flatten ``names``."""
    import jax
    import jax.numpy as jnp

    from engine.infer import runner

    data = jax.tree.map(jnp.asarray, problem.data)
    parents = tuple(jnp.asarray(p) for p in problem.parents)
    hyper_key, draw_key = jax.random.split(jax.random.PRNGKey(spec.seed))
    samples, divergences, sampler = runner.run_nuts(
        model, (data, parents), {}, rng_key=hyper_key, warmup=spec.warmup, draws=spec.draws,
        chains=spec.chains)
    flat = {name: np.asarray(samples[name]).reshape(-1) for name in names}
    return HyperDraws(samples, flat, divergences, sampler, data, parents, draw_key)


class Summaries(NamedTuple):
    link: tuple             # per level GroupSummary on the link scale (first real nodes only)
    outcome: tuple          # per level GroupSummary on the outcome scale (== link for the identity)
    ate: np.ndarray         # (total draws,)
    ate_link: np.ndarray    # (total draws,)
    batch: int


def _batch_sums(rng_keys, hyper_batch, mask, *args, one_draw):
    """vmap of ``one_draw`` over a batch, reduced to sums per node; ``mask`` (B,) zeroes
    the repeated draws that pad the last batch to the compiled size."""
    import jax
    import jax.numpy as jnp
    from jax.scipy.special import ndtr

    out = jax.vmap(one_draw, in_axes=(0, 0) + (None,) * len(args))(rng_keys, hyper_batch, *args)
    w = mask[:, None]
    link = [(draw, (w * mean).sum(0), (w * (var + mean**2)).sum(0), (w * ndtr(mean / jnp.sqrt(var))).sum(0))
            for draw, mean, var in out.link]
    outcome = [(draw, (w * draw).sum(0), (w * draw**2).sum(0), (w * (draw > 0)).sum(0)) for draw in out.outcome]
    return link, outcome, out.ate, out.ate_link


def _compiled(one_draw):
    # A partial hashes by identity; key the cache on its function and keywords instead.
    return _compiled_for(one_draw.func, tuple(sorted(one_draw.keywords.items())))


@lru_cache(maxsize=16)
def _compiled_for(func, keywords):
    import jax

    return jax.jit(partial(_batch_sums, one_draw=partial(func, **dict(keywords))))


def summarise(one_draw, flat_hyper: dict, args: tuple, *, rng_key, num_nodes, real_nodes, interval: float,
              scale: float = 1.0) -> Summaries:
    """Run ``one_draw(key, hyper, *args)`` for every draw in ``flat_hyper`` (name -> (total,)).

    ``one_draw`` is a ``functools.partial`` of a module-level function with hashable
    keywords (the static sizes), so a later fit of the same shapes reuses the compiled batch.
    ``scale`` multiplies every effect (the outcome's units for standardised models).
    """
    import jax
    import jax.numpy as jnp

    total = next(iter(flat_hyper.values())).shape[0]
    total_nodes = int(sum(num_nodes))
    batch = int(np.clip(BATCH_BYTES // (8 * 8 * max(total_nodes, 1)), 1, 256))
    batch = min(batch, total)
    stride = retained_stride(total, total_nodes)
    link_acc = [Accumulator(n, stride) for n in num_nodes]
    outcome_acc = None
    batch_fn = _compiled(one_draw)
    keys = jax.random.split(rng_key, total)
    ate = np.empty(total)
    ate_link = np.empty(total)
    for first in range(0, total, batch):
        index = np.minimum(np.arange(first, first + batch), total - 1)  # pad the last batch by repetition
        used = min(batch, total - first)
        hyper_batch = {name: jnp.asarray(values[index]) for name, values in flat_hyper.items()}
        mask = jnp.asarray(np.arange(batch) < used, dtype=jnp.result_type(float))
        link, outcome, batch_ate, batch_ate_link = batch_fn(keys[index], hyper_batch, mask, *args)
        ate[first:first + used] = np.asarray(batch_ate[:used]) * scale
        ate_link[first:first + used] = np.asarray(batch_ate_link[:used]) * scale
        if outcome and outcome_acc is None:
            outcome_acc = [Accumulator(n, stride) for n in num_nodes]
        for accs, sums in ((link_acc, link), (outcome_acc, outcome)):
            for acc, (draw, mean_sum, second_sum, pos_sum) in zip(accs or [], sums):
                acc.add_sums(np.asarray(draw[:used]) * scale, np.asarray(mean_sum) * scale,
                             np.asarray(second_sum) * scale**2, np.asarray(pos_sum))
    link_groups = tuple(acc.finish(interval).first(n) for acc, n in zip(link_acc, real_nodes))
    outcome_groups = (tuple(acc.finish(interval).first(n) for acc, n in zip(outcome_acc, real_nodes))
                      if outcome_acc else link_groups)
    return Summaries(link_groups, outcome_groups, ate, ate_link, batch)


def link_summaries(draws, upward, parents, prior_cov, prior_mean) -> list:
    """Per level (τ draw, E[τ | parent, data], Var[τ | parent, data]) from one downward draw."""
    from kernels import gaussian_tree as tree

    cond_means = tree.conditional_mean(draws, upward, parents, prior_cov, prior_mean)
    out = []
    for draw, cond_mean, precision in zip(draws, cond_means, upward.precision):
        # Var[τ | parent, data] = (A⁻¹)₁₁ = A₀₀ / det A.
        det = precision[:, 0, 0] * precision[:, 1, 1] - precision[:, 0, 1] * precision[:, 1, 0]
        out.append((draw[:, 1], cond_mean[:, 1], precision[:, 0, 0] / det))
    return out
