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
    with pytest.raises(ValueError, match="CAUSAL_ENGINE_HYPER_DEVICE='tpu-please'.*auto, cpu or default"):
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


def test_chains_on_threads_are_the_chains_of_one_call():
    """Each chain's draws depend on its own key only: two chains on threads equal the same two
    chains computed one call at a time (same program, same keys), in order."""
    y = jnp.asarray(np.random.default_rng(1).normal(-0.5, 2.0, 30))
    args = (y, jnp.asarray(2.0))
    both, _, info = runner.run_hyper_nuts(_model, args, rng_key=jax.random.PRNGKey(3), warmup=50, draws=30, chains=2)
    if info["chain_method"] != "threads":
        pytest.skip("chains are vectorised on this backend")
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    program = next(iter(p for k, p in runner._PROGRAMS.items() if k[2:4] == (50, 30)))
    for i in range(2):
        alone = jax.device_get(program(keys[i:i + 1], *args))[0]
        np.testing.assert_array_equal(both["mu"][i], alone["mu"][0])


def test_laplace_start_finds_the_mode_and_curvature_of_a_gaussian():
    """A correlated Gaussian potential: the mode and diag(H⁻¹) exactly, the start one draw away."""
    mean = jnp.array([3.0, -2.0, 0.5])
    cov = jnp.array([[1e-6, 5e-7, 0.0], [5e-7, 4e-6, 0.0], [0.0, 0.0, 2.0]])
    precision = jnp.linalg.inv(cov)

    def potential(z):
        d = jnp.stack([z["a"], z["b"], z["c"]]) - mean
        return 0.5 * d @ precision @ d

    start, inverse_mass = jax.jit(runner.laplace_start, static_argnums=0)(
        potential, {"a": 0.0, "b": 0.0, "c": 0.0}, jax.random.PRNGKey(1))
    np.testing.assert_allclose(inverse_mass, np.diag(np.linalg.inv(np.asarray(precision))), rtol=1e-5)
    z = np.array([start["a"], start["b"], start["c"]])
    assert np.all(np.abs(z - np.asarray(mean)) < 5 * np.sqrt(np.asarray(inverse_mass)))   # near the mode
    assert np.any(z != np.asarray(mean))                                                     # jittered
