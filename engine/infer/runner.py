"""The one compile boundary: devices, precision, seeds and the NUTS driver."""
from __future__ import annotations

import os
import sys
from functools import partial


def configure_jax() -> None:
    """float64 on every backend unless ``CAUSAL_ENGINE_X64=0`` (DESIGN: float32 on a GPU only
    where checked). On the H100 the float32 Gaussian-tree marginal was 0.2 nats off float64
    at 10⁶ leaves (benchmarks/RESULTS.md), too coarse for NUTS's energy; the collapsed
    one-level model costs O(configurations) per gradient, so float64 costs it nothing. And,
    when ``CAUSAL_ENGINE_CACHE=DIR`` is set, JAX's persistent compilation cache
    in DIR: compiling the sampler costs seconds, and a later process fitting the
    same shapes (buckets) skips it.

    Opt-in because JAX (0.10) writes cache entries without a lock: processes
    sharing one folder at the same moment (parallel batch jobs, a test run beside
    another) can read a half-written entry; a crash was seen here that way. It was tried on
    by default (a private folder per process: NumPyro 0.22 re-jits its sampling loop on every
    ``MCMC.run``, and the cache turned those compiles into loads, 72 s → 45 s for three SBC
    replications), but a long test process then segfaulted inside JAX's cache write
    (``put_executable_and_time``), so it stays opt-in.
    """
    import jax

    if os.environ.get("CAUSAL_ENGINE_X64", "1") != "0":
        jax.config.update("jax_enable_x64", True)
    cache = os.environ.get("CAUSAL_ENGINE_CACHE", "")
    if cache and cache != "0" and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def devices() -> list[str]:
    import jax

    return [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in jax.devices()]


def chain_method(chains: int) -> str:
    import jax

    # "sequential" recompiles the sampler per chain (~10 s each here); vectorised chains compile once.
    return "parallel" if chains > 1 and jax.local_device_count() >= chains else "vectorized"


def show_progress() -> bool:
    return os.environ.get("CAUSAL_ENGINE_PROGRESS", "auto") == "1" or (
        os.environ.get("CAUSAL_ENGINE_PROGRESS", "auto") == "auto" and sys.stderr.isatty())


# Samplers compiled in this process, keyed by the model's static description and the
# sampler settings: a second fit with the same shapes reuses the compiled program
# (data are arguments, never constants), which SBC and benchmarks rely on.
_SAMPLERS: dict = {}


def static_key(model_fn) -> str:
    """A key for a ``functools.partial`` model: its function and static keywords."""
    keywords = getattr(model_fn, "keywords", {})
    name = getattr(getattr(model_fn, "func", model_fn), "__qualname__", repr(model_fn))
    return name + repr(sorted(keywords.items()))


def _shape_key(model_args) -> tuple:
    """Shapes and dtypes of the arguments' leaves: part of every compiled program's key.

    NumPyro's MCMC, reused for arguments of another shape, failed inside its vectorised-chain
    sampler (seen with GLM fits whose quadrature tables differ); the dtype covers x64 on/off."""
    import jax

    return tuple((tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__)))
                 for leaf in jax.tree.leaves(model_args))


def _cached(store: dict, key, build_fn, limit: int = 16):
    """``store[key]``, built by ``build_fn()`` on a miss; the oldest entry goes beyond ``limit``."""
    value = store.get(key)
    if value is None:
        value = build_fn()
        if len(store) >= limit:
            store.pop(next(iter(store)))
        store[key] = value
    return value


def run_nuts(model_fn, model_args: tuple, model_kwargs: dict, *, rng_key, warmup: int, draws: int,
             chains: int, target_accept: float = 0.85, init_params=None):
    """Run NUTS; data travel as ``model_args`` (traced), never as closed-over constants."""
    from numpyro.infer import MCMC, NUTS, init_to_median

    method = chain_method(chains)
    key = (static_key(model_fn), _shape_key(model_args), warmup, draws, chains, target_accept, method,
           show_progress())

    def build():
        kernel = NUTS(model_fn, target_accept_prob=target_accept, init_strategy=init_to_median(num_samples=15))
        return MCMC(kernel, num_warmup=warmup, num_samples=draws, num_chains=chains, chain_method=method,
                    progress_bar=show_progress(), jit_model_args=True)

    mcmc = _cached(_SAMPLERS, key, build)
    mcmc.run(rng_key, *model_args, init_params=init_params, extra_fields=("diverging",), **model_kwargs)
    samples = mcmc.get_samples(group_by_chain=True)
    divergences = int(mcmc.get_extra_fields()["diverging"].sum())
    return samples, divergences, {"warmup": warmup, "draws": draws, "chains": chains,
                                  "chain_method": chain_method(chains), "target_accept": target_accept}


# Compiled whole-run NUTS programs, keyed like _SAMPLERS (see run_hyper_nuts), and the
# one-chain executables compiled ahead for chains on threads.
_PROGRAMS: dict = {}
_EXECUTABLES: dict = {}


def hyper_device(small: bool):
    """The device for the hyperparameter NUTS, or ``None`` for JAX's default device.

    ``CAUSAL_ENGINE_HYPER_DEVICE``: ``cpu`` (the host), ``default`` (JAX's default device, a
    GPU when there is one) or ``auto`` (the default): the host when the marginal is ``small``
    (O(leaf configurations), a few thousand numbers a gradient whatever the group count) and
    the default device is an accelerator. Such a NUTS is a long chain of tiny steps, which a
    GPU runs no faster than a CPU core while every loop turn costs it a kernel launch and a
    host round trip; the group-sized work (the downward passes) stays on the accelerator.
    """
    import jax

    choice = os.environ.get("CAUSAL_ENGINE_HYPER_DEVICE", "auto")
    if choice not in ("auto", "cpu", "default"):
        raise ValueError(f"CAUSAL_ENGINE_HYPER_DEVICE={choice!r}: expected auto, cpu or default")
    if choice == "default" or jax.default_backend() == "cpu" or (choice == "auto" and not small):
        return None
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:    # the CPU backend is off (JAX_PLATFORMS names the accelerator only)
        return None


def run_hyper_nuts(model_fn, model_args: tuple, *, rng_key, warmup: int, draws: int, chains: int,
                   target_accept: float = 0.85, device=None):
    """NUTS for the few hyperparameters of a collapsed model: initialisation, warm-up and
    sampling in one compiled program, cached per model and shapes (on a CPU one chain a
    call, the chains on threads; elsewhere every chain in one call).

    NumPyro's ``MCMC.run`` compiles its sampling loop again on every call, even for the
    same shapes (in ``vectorized`` mode ``HMC.init`` wraps the step in a fresh ``vmap`` each
    time): at 1e3 groups a repeated `exact` fit spent ~7 of its 7 s compiling. Here NUTS
    (diagonal mass matrix adapted in windows, ``target_accept``, tree depth 10, as
    ``run_nuts``) is driven through NumPyro's functional ``hmc()`` inside one ``jax.jit``,
    from ``init_to_median(15)`` moved to a Laplace start (``laplace_start``), so a later fit
    with the same shapes (SBC, batch jobs, benchmarks) reuses the program. No progress bar:
    with the hyperparameters alone the run is short; the compile is most of it.

    The adapted mass matrix is not regularised. NumPyro (like Stan) shrinks each window's
    variance estimate toward ``1e-3·I`` with weight ``5/(n+5)``, an absolute floor of ~1e-5
    on every diagonal entry; with 10⁶ groups the hyperparameters' posterior variances are
    1e-7–1e-6 (noise, the means), so the floor set the mass matrix 10–100× off, the step size
    to 0.1 and ~21 leapfrog steps an iteration. Unregularised: step 0.6, ~6.4 steps, and the
    variances matched (benchmarks/RESULTS.md). The estimate comes from a window's draws of a
    handful of parameters (≥ 25 a window from ~150 warm-up iterations on; NumPyro shrinks the
    windows below that); a parameter that did not move in a whole window (every proposal
    rejected) would get a zero variance, and its chain then stays stuck, which R-hat and
    ESS report, where the regularised matrix would have hidden it.

    ``device`` (see ``hyper_device``): run there, the arguments moved to it; ``None``: JAX's
    default device.
    """
    import jax
    import numpy as np

    platform = device.platform if device is not None else jax.default_backend()
    in_turn = _chains_in_turn(platform)
    if device is not None:
        rng_key, model_args = jax.device_put((rng_key, model_args), device)
    key = (static_key(model_fn), _shape_key(model_args), warmup, draws, target_accept, platform)
    program = _cached(_PROGRAMS, key, lambda: jax.jit(partial(
        _nuts_program, model_fn=model_fn, warmup=warmup, draws=draws, target_accept=target_accept, in_turn=in_turn)))
    chain_keys = jax.random.split(rng_key, chains)
    if in_turn and chains > 1:
        # One chain a call, the calls on threads: XLA runs each on the calling thread without
        # the GIL, so the chains use the host's cores (1.5x on 2 cores for 4 chains, measured).
        # Compiled ahead, here, so that no two threads trace the model at once (NumPyro's
        # handler stack is one global list); the executable is cached with the program.
        compiled = _cached(_EXECUTABLES, key, lambda: program.lower(chain_keys[:1], *model_args).compile())
        workers = min(chains, os.cpu_count() or 1)
        with _thread_pool(workers) as pool:
            parts = list(pool.map(lambda i: jax.device_get(compiled(chain_keys[i:i + 1], *model_args)),
                                  range(chains)))
        samples, diverging = jax.tree.map(lambda *a: np.concatenate(a), *parts)
    else:
        samples, diverging = jax.device_get(program(chain_keys, *model_args))
    where = device if device is not None else jax.devices()[0]
    return samples, int(diverging.sum()), {"warmup": warmup, "draws": draws, "chains": chains,
                                           "chain_method": ("threads" if in_turn and chains > 1 else
                                                            "sequential" if in_turn else "vectorized"),
                                           "target_accept": target_accept,
                                           "sampler_device": f"{where.platform}:{where.id}",
                                           "start": "Laplace: posterior mode by damped Newton, one draw of "
                                                    "N(mode, diag H⁻¹) away, diag H⁻¹ as the first inverse mass",
                                           "driver": "one compiled program (numpyro.infer.hmc.hmc)"}


def _thread_pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="causal-engine-chain")


def _nuts_program(chain_keys, *model_args, model_fn, warmup, draws, target_accept, in_turn):
    import jax
    from numpyro.infer import init_to_median
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import initialize_model

    def one_chain(chain_key):
        init_key, run_key = jax.random.split(chain_key)
        init_params, potential_fn_gen, postprocess_fn, _ = initialize_model(
            init_key, model_fn, model_args=model_args, dynamic_args=True,
            init_strategy=init_to_median(num_samples=15))
        init_kernel, sample_kernel = hmc(potential_fn_gen=potential_fn_gen, algo="NUTS")
        start_key, run_key = jax.random.split(run_key)
        start, inverse_mass = laplace_start(potential_fn_gen(*model_args), init_params.z, start_key)
        state = init_kernel(start, num_warmup=warmup, inverse_mass_matrix=inverse_mass,
                            target_accept_prob=target_accept, max_tree_depth=10, regularize_mass_matrix=False,
                            model_args=model_args, rng_key=run_key)

        def step(state, _):
            state = sample_kernel(state, model_args=model_args)
            return state, (state.z, state.diverging)

        # One scan over warm-up and sampling (the kernel adapts while its counter is below
        # ``warmup``): the NUTS step is compiled once, not once per phase as two scans would.
        _, (z, diverging) = jax.lax.scan(step, state, None, length=warmup + draws)
        z, diverging = jax.tree.map(lambda a: a[warmup:], (z, diverging))
        constrain = postprocess_fn(*model_args)
        return jax.vmap(constrain)(z), diverging

    return jax.lax.map(one_chain, chain_keys) if in_turn else jax.vmap(one_chain)(chain_keys)


# Damped Newton iterations of ``laplace_start`` (a fixed count: the loop runs under vmap).
START_ITERATIONS = 30


def laplace_start(potential_fn, z, rng_key, iterations: int = START_ITERATIONS):
    """A chain's start and first inverse mass matrix from a Laplace approximation.

    From the unconstrained point ``z`` (NumPyro's ``init_to_median``), damped Newton steps
    (Levenberg–Marquardt: a step is kept only if the potential falls) find the posterior
    mode; the Hessian comes from central differences of the gradient, which works for any
    differentiable potential (custom JVPs and VJPs alike). The chain starts one draw of
    ``N(mode, diag(H⁻¹))`` away from the mode, with ``diag(H⁻¹)`` as its inverse mass matrix;
    the windowed adaptation then re-estimates the matrix from the chain's own draws.

    Why: the hyperparameters' posterior sds shrink like 1/√groups (~1e-4 at 10⁷ groups)
    while the default start is O(1) away under an identity mass matrix. Warm-up then spent
    its windows travelling, and a window's variance estimate took in the transient: at 10⁷
    groups one chain's matrix was 160–300× off, its step 0.047 with ~35 leapfrog steps an
    iteration against 0.47 and ~6, and on the H100 a fit ended at R-hat 1.53
    (benchmarks/RESULTS.md). Returns ``(z_start, inverse_mass_diagonal)``; where the
    Hessian at the end is not positive definite, the start is ``z`` and the matrix the
    identity (NumPyro's own default).
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    x0, unravel = ravel_pytree(z)
    d = x0.shape[0]
    value_and_grad = jax.vmap(jax.value_and_grad(lambda x: potential_fn(unravel(x))))

    def evaluate(x):
        """Potential, gradient and finite-difference Hessian at x: 2d + 1 gradients in one batch."""
        h = 1e-5 * jnp.maximum(1.0, jnp.abs(x))
        offsets = jnp.concatenate([jnp.zeros((1, d), x.dtype), jnp.diag(h), -jnp.diag(h)])
        values, grads = value_and_grad(x + offsets)
        hessian = (grads[1:1 + d] - grads[1 + d:]) / (2.0 * h[:, None])
        return values[0], grads[0], 0.5 * (hessian + hessian.T)

    def newton(carry, _):
        x, u, g, hessian, trial, damping = carry
        u_t, g_t, h_t = evaluate(trial)
        better = jnp.isfinite(u_t) & jnp.all(jnp.isfinite(g_t)) & jnp.all(jnp.isfinite(h_t)) & (u_t < u)
        x, u, g, hessian = jax.tree.map(lambda new, old: jnp.where(better, new, old),
                                        (trial, u_t, g_t, h_t), (x, u, g, hessian))
        damping = jnp.where(better, damping * 0.3, damping * 4.0)
        scale = jnp.maximum(jnp.abs(jnp.diag(hessian)), 1e-12)
        step = jnp.linalg.solve(hessian + damping * jnp.diag(scale), g)
        return (x, u, g, hessian, x - step, damping), None

    u0, g0, h0 = evaluate(x0)
    scale0 = jnp.maximum(jnp.abs(jnp.diag(h0)), 1e-12)
    first = x0 - jnp.linalg.solve(h0 + 1e-3 * jnp.diag(scale0), g0)
    (x, _, _, hessian, _, _), _ = jax.lax.scan(newton, (x0, u0, g0, h0, first, jnp.asarray(1e-3, x0.dtype)),
                                               None, length=iterations)
    variance = jnp.diag(jnp.linalg.inv(hessian))
    usable = jnp.all(jnp.isfinite(jnp.linalg.cholesky(hessian))) & jnp.all(variance > 0) & jnp.all(jnp.isfinite(x))
    jitter = jnp.sqrt(jnp.where(usable, variance, 1.0)) * jax.random.normal(rng_key, (d,), x0.dtype)
    # A nearly singular H gives a huge diag H⁻¹: where the jittered point's potential is not
    # finite, the chain starts at the mode itself.
    jittered_ok = jnp.isfinite(potential_fn(unravel(x + jitter)))
    start = jnp.where(usable, jnp.where(jittered_ok, x + jitter, x), x0)
    return unravel(start), jnp.where(usable, variance, jnp.ones_like(variance))


def _chains_in_turn(platform: str) -> bool:
    """On a CPU the chains run one after another inside the program (``lax.map``), elsewhere
    side by side (``vmap``). Vectorised chains step in lock-step, so every iteration costs the
    longest chain's tree, and on a CPU the arithmetic of the four is not free: at 10⁶ groups
    on machine A the sampling took 8.4 s vectorised and 5.8 s in turn, and compiled ~2.5 s
    faster (benchmarks/RESULTS.md). On a GPU the four chains cost about one. With more than
    one chain on a CPU each chain is its own call of the one-chain program, on its own thread
    (``run_hyper_nuts``)."""
    return platform == "cpu"
