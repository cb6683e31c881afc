"""Where the hyperparameter NUTS runs: the placement option and the recorded device."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from engine.infer import runner


def _model(y, scale):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    numpyro.sample("y", dist.Normal(mu, scale), obs=y)


def test_hyper_device_rejects_an_unknown_choice(monkeypatch):
    monkeypatch.setenv("CAUSAL_ENGINE_HYPER_DEVICE", "tpu-please")
    from engine.errors import SpecError   # an EngineError: the CLI's exit 2 with the message

    with pytest.raises(SpecError, match="CAUSAL_ENGINE_HYPER_DEVICE='tpu-please'.*auto, cpu or default"):
        runner.hyper_device(small=True)


@pytest.mark.parametrize("choice", ["auto", "cpu", "default"])
def test_on_a_cpu_backend_every_choice_is_the_default_device(monkeypatch, choice):
    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator is present: the choices differ there")
    monkeypatch.setenv("CAUSAL_ENGINE_HYPER_DEVICE", choice)
    assert runner.hyper_device(small=True) is None and runner.hyper_device(small=False) is None


def test_an_explicit_device_runs_there_and_is_recorded():
    y = jnp.asarray(np.random.default_rng(0).normal(1.5, 1.0, 50))
    args = (y, jnp.asarray(1.0))
    settings = dict(rng_key=jax.random.PRNGKey(0), warmup=60, draws=40, chains=2)
    on_default, _, default_info = runner.run_hyper_nuts(_model, args, **settings)
    on_host, _, host_info = runner.run_hyper_nuts(_model, args, device=jax.devices("cpu")[0], **settings)
    assert host_info["sampler_device"] == "cpu:0"
    assert host_info["chain_method"] == "threads"      # one chain a call, the calls on threads
    assert default_info["sampler_device"] == f"{jax.devices()[0].platform}:0"
    if jax.default_backend() == "cpu":   # the same device and program: the same draws
        np.testing.assert_array_equal(on_default["mu"], on_host["mu"])
    assert np.asarray(on_host["mu"]).shape == (2, 40)


def test_chains_on_threads_are_the_chains_of_one_call(monkeypatch):
    """Each chain's draws depend on its own key and start only: two chains on threads equal
    the same two chains computed in one call of the program (same keys, same starts)."""
    y = jnp.asarray(np.random.default_rng(1).normal(-0.5, 2.0, 30))
    args = (y, jnp.asarray(2.0))
    starts = []
    laplace_start = runner.laplace_start
    monkeypatch.setattr(runner, "laplace_start", lambda *a, **k: starts.append(laplace_start(*a, **k)) or starts[-1])
    both, _, info = runner.run_hyper_nuts(_model, args, rng_key=jax.random.PRNGKey(3), warmup=50, draws=30, chains=2)
    if info["chain_method"] != "threads":
        pytest.skip("chains are vectorised on this backend")
    assert "Laplace" in info["start"] and "converged" in info["start"] and info["mass_matrix"] == "dense"
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    program = next(iter(p for k, p in runner._PROGRAMS.items() if k[2:4] == (50, 30)))
    together = jax.device_get(program(keys, starts[0].points, starts[0].covariance, *args))[0]
    np.testing.assert_array_equal(both["mu"], together["mu"])


def test_laplace_start_finds_the_mode_and_curvature_of_a_gaussian():
    """A correlated Gaussian potential: the mode and diag(H⁻¹) exactly, each chain one draw away."""
    mean = np.array([3.0, -2.0, 0.5])
    cov = np.array([[1e-6, 5e-7, 0.0], [5e-7, 4e-6, 0.0], [0.0, 0.0, 2.0]])
    precision = np.linalg.inv(cov)

    def evaluate(points):
        d = points - mean
        return 0.5 * np.einsum("ni,ij,nj->n", d, precision, d), d @ precision

    start = runner.laplace_start(evaluate, 3, np.random.default_rng(1), chains=4)
    assert start.laplace and start.converged and start.iterations < 20
    np.testing.assert_allclose(start.covariance, cov, rtol=1e-5, atol=1e-12)
    assert start.points.shape == (4, 3)
    sds = np.abs(start.points - mean) / np.sqrt(np.diag(start.covariance))
    assert np.all(sds < 5)                                                    # near the mode
    assert len({tuple(p) for p in start.points}) == 4 and np.all(start.points != mean)   # jittered apart


def test_laplace_start_moves_off_a_non_finite_origin_and_falls_back_without_curvature():
    """Infinite at the origin: it starts at a finite uniform point. A potential with no
    positive-definite Hessian (linear): NumPyro's defaults, uniform points and the identity."""
    def shifted(points):      # finite only where x₀ > 0.5
        ok = points[:, 0] > 0.5
        d = points - 1.0
        return np.where(ok, 0.5 * (d**2).sum(1), np.inf), d

    start = runner.laplace_start(shifted, 2, np.random.default_rng(2), chains=3)
    assert start.laplace and start.converged
    np.testing.assert_allclose(start.covariance, np.eye(2), rtol=1e-6, atol=1e-9)

    def linear(points):
        return points.sum(1), np.ones_like(points)

    flat = runner.laplace_start(linear, 2, np.random.default_rng(3), chains=3)
    assert not flat.laplace and "uniform(-2, 2)" in flat.describe()
    np.testing.assert_array_equal(flat.covariance, np.eye(2))
    assert np.all(np.abs(flat.points) <= 2.0) and len({tuple(p) for p in flat.points}) == 3


def test_laplace_start_names_the_problem_when_no_start_is_finite():
    with pytest.raises(FloatingPointError, match="not finite at the unconstrained origin"):
        runner.laplace_start(lambda p: (np.full(len(p), np.nan), np.zeros_like(p)), 2,
                             np.random.default_rng(0), chains=2)
