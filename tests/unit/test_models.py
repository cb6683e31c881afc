"""The model stage: padding is exact, and new row or group counts reuse compiled code."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

import engine
from engine import validate
from engine.api import _model
from engine.encode import encode
from engine.models import gaussian
from engine.reduce import reduce
from engine.spec import Spec

SPEC = Spec(outcome="y", treatment="treated", groups=("country", "region"), covariates=("pre",))


def problem_for(rows, groups, seed):
    sim = engine.simulate(rows=rows, groups=groups, levels=["country", "region"], seed=seed, covariate=True)
    cells = reduce(validate.check(validate.resolve_source(sim.rows), SPEC), SPEC)
    encoding = encode(cells)
    return _model(cells, encoding, SPEC)[0], encoding


def hyper_point(problem):
    point = {"baseline_mean": 0.1, "effect_mean": 0.2, "noise": 0.9, "slope.pre": 0.3}
    for level in problem.levels:
        point[f"baseline_scale.{level}"] = 0.5
        point[f"effect_scale.{level}"] = 0.3
    return {k: jnp.asarray(v) for k, v in point.items()}


def collapsed_log_density(problem, data, parents, num_nodes):
    model = partial(gaussian.collapsed_model, levels=problem.levels, num_nodes=num_nodes,
                    priors=problem.std_priors, covariates=problem.covariates)
    return log_density(model, (data, parents), {}, hyper_point(problem))[0]


def test_padding_nodes_leaves_the_marginal_likelihood_unchanged():
    problem, encoding = problem_for(2_000, 90, seed=1)
    assert problem.num_nodes != problem.real_nodes  # padded
    data = jax.tree.map(jnp.asarray, problem.data)
    padded = collapsed_log_density(problem, data, tuple(map(jnp.asarray, problem.parents)), problem.num_nodes)
    exact = collapsed_log_density(problem, data, tuple(map(jnp.asarray, encoding.parents)), encoding.num_nodes)
    assert float(padded) == pytest.approx(float(exact), rel=1e-12)


def test_new_row_and_group_counts_do_not_retrace():
    traces = []

    def density(data, parents, problem_static):
        traces.append(1)
        return collapsed_log_density(problem_static, data, parents, problem_static.num_nodes)

    first, _ = problem_for(2_000, 90, seed=2)
    second, _ = problem_for(2_300, 93, seed=3)
    assert first.num_nodes == second.num_nodes and first.data.n.shape == second.data.n.shape
    assert first.real_nodes != second.real_nodes
    compiled = jax.jit(density, static_argnums=2)

    def static(problem):
        # Only the shapes and priors are static; default priors are data-free once standardised.
        return problem._replace(data=None, parents=None, leaf_rows=None, standardisation=None,
                                real_nodes=None)

    for problem in (first, second):
        value = compiled(jax.tree.map(jnp.asarray, problem.data), tuple(map(jnp.asarray, problem.parents)),
                         _Hashable(static(problem)))
        assert np.isfinite(float(value))
    assert len(traces) == 1


class _Hashable:
    """Wraps the static part of a Problem for jit's static_argnums (hash by its repr)."""

    def __init__(self, problem):
        self.problem = problem

    def __getattr__(self, name):
        return getattr(self.problem, name)

    def __hash__(self):
        return hash(repr(self.problem))

    def __eq__(self, other):
        return repr(self.problem) == repr(other.problem)
