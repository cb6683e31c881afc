"""The one compile boundary: devices, precision, seeds and the NUTS driver."""
from __future__ import annotations

import math
import os
import sys
from functools import partial
from typing import NamedTuple


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
        from engine.errors import SpecError

        raise SpecError(f"CAUSAL_ENGINE_HYPER_DEVICE={choice!r}: expected auto, cpu or default; "
                        "unset it for auto")
    if choice == "default" or jax.default_backend() == "cpu" or (choice == "auto" and not small):
        return None
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:    # the CPU backend is off (JAX_PLATFORMS names the accelerator only)
        return None


def run_hyper_nuts(model_fn, model_args: tuple, *, rng_key, warmup: int, draws: int, chains: int,
                   target_accept: float = 0.85, device=None):
    """NUTS for the few hyperparameters of a collapsed model: a Laplace start, then warm-up
    and sampling in one compiled program, cached per model and shapes (on a CPU one chain a
    call, the chains on threads; elsewhere every chain in one call).

    NumPyro's ``MCMC.run`` compiles its sampling loop again on every call, even for the
    same shapes (in ``vectorized`` mode ``HMC.init`` wraps the step in a fresh ``vmap`` each
    time): at 1e3 groups a repeated `exact` fit spent ~7 of its 7 s compiling. Here NUTS
    (mass matrix adapted in windows, ``target_accept``, tree depth 10, as ``run_nuts``) is
    driven through NumPyro's functional ``hmc()`` inside one ``jax.jit``,
    so a later fit with the same shapes (SBC, batch jobs, benchmarks) reuses the program.
    The start (``laplace_start``) runs on the host around one small compiled program, the
    potential and its gradient at a batch of points: compiled into the NUTS program with
    NumPyro's ``init_to_median``, it had cost ~2.5 s of a 5-s compile (benchmarks/RESULTS.md).
    No progress bar: with the hyperparameters alone the run is short; the compile is most
    of it.

    The mass matrix is dense up to ``DENSE_MAX`` hyperparameters, diagonal beyond, and its
    adaptation is not regularised. NumPyro (like Stan) shrinks each window's
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
    layout = _cached(_LAYOUTS, key[:2], lambda: Layout.of(model_fn, model_args))
    dense = layout.size <= DENSE_MAX
    evaluate = _cached(_PROGRAMS, key[:2] + (platform, "evaluate"),
                       lambda: jax.jit(partial(_evaluate_program, model_fn=model_fn, layout=layout)))
    chain_keys = jax.random.split(rng_key, chains)
    start = laplace_start(lambda points: jax.device_get(evaluate(points, *model_args)), layout.size,
                          np.random.default_rng(np.asarray(jax.random.key_data(rng_key))), chains,
                          dtype=layout.dtype)
    program = _cached(_PROGRAMS, key, lambda: jax.jit(partial(
        _nuts_program, model_fn=model_fn, layout=layout, warmup=warmup, draws=draws, target_accept=target_accept,
        in_turn=in_turn, dense=dense)))
    starts, inverse_mass = (np.asarray(a, layout.dtype) for a in (start.points, start.covariance if dense else
                                                                  np.diag(start.covariance)))
    if in_turn and chains > 1:
        # One chain a call, the calls on threads: XLA runs each on the calling thread without
        # the GIL, so the chains use the host's cores (1.5x on 2 cores for 4 chains, measured).
        # Compiled ahead, here, so that no two threads trace the model at once (NumPyro's
        # handler stack is one global list); the executable is cached with the program.
        compiled = _cached(_EXECUTABLES, key, lambda: program.lower(
            chain_keys[:1], starts[:1], inverse_mass, *model_args).compile())
        workers = min(chains, os.cpu_count() or 1)
        with _thread_pool(workers) as pool:
            parts = list(pool.map(lambda i: jax.device_get(compiled(
                chain_keys[i:i + 1], starts[i:i + 1], inverse_mass, *model_args)), range(chains)))
        samples, diverging = jax.tree.map(lambda *a: np.concatenate(a), *parts)
    else:
        samples, diverging = jax.device_get(program(chain_keys, starts, inverse_mass, *model_args))
    where = device if device is not None else jax.devices()[0]
    return samples, int(diverging.sum()), {"warmup": warmup, "draws": draws, "chains": chains,
                                           "chain_method": ("threads" if in_turn and chains > 1 else
                                                            "sequential" if in_turn else "vectorized"),
                                           "target_accept": target_accept,
                                           "mass_matrix": "dense" if dense else "diagonal",
                                           "sampler_device": f"{where.platform}:{where.id}",
                                           "start": start.describe(),
                                           "driver": "one compiled program (numpyro.infer.hmc.hmc)"}


def _thread_pool(workers: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="causal-engine-chain")


# Unconstrained layouts of models seen in this process, keyed by model and argument shapes.
_LAYOUTS: dict = {}


class Layout(NamedTuple):
    """A model's unconstrained sites as one flat vector (``jax.flatten_util.ravel_pytree``'s order)."""

    sites: dict             # name -> jax.ShapeDtypeStruct of NumPyro's unconstrained ``z``
    size: int
    dtype: object

    @classmethod
    def of(cls, model_fn, model_args) -> "Layout":
        """From the model's trace alone (``jax.eval_shape``: nothing is compiled or run)."""
        import jax

        sites = jax.eval_shape(partial(_unconstrained_sites, model_fn), *model_args)
        leaves = jax.tree.leaves(sites)
        dtypes = {leaf.dtype for leaf in leaves}
        if len(dtypes) != 1:
            raise TypeError(f"the model's unconstrained sites mix dtypes {sorted(map(str, dtypes))}")
        return cls(sites, int(sum(math.prod(leaf.shape) for leaf in leaves)), dtypes.pop())

    def unflatten(self, x):
        """The ``z`` dict from a flat vector; inside a traced program."""
        import jax
        import jax.numpy as jnp
        from jax.flatten_util import ravel_pytree

        return ravel_pytree(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.sites))[1](x)


def _unconstrained_sites(model_fn, *model_args) -> dict:
    """The model's latent sites in the unconstrained space, at one prior draw (for their
    shapes: ``Layout.of`` traces this without running it). One trace of the model, where
    NumPyro's ``initialize_model`` traces its search for a valid start too (0.27 s against
    0.39 s at 1e3 groups on machine A)."""
    from numpyro import handlers
    from numpyro.distributions import biject_to

    sites = handlers.trace(handlers.seed(model_fn, 0)).get_trace(*model_args)
    return {name: biject_to(site["fn"].support).inv(site["value"]) for name, site in sites.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["fn"].support.is_discrete}


def _model_functions(model_fn, model_args):
    """NumPyro's potential and constraining functions of the model (traced only: inside a
    compiled program the unused initialisation is dead code and XLA drops it)."""
    import jax
    from numpyro.infer import init_to_uniform
    from numpyro.infer.util import initialize_model

    _, potential_fn_gen, postprocess_fn, _ = initialize_model(
        jax.random.PRNGKey(0), model_fn, model_args=model_args, dynamic_args=True,
        init_strategy=init_to_uniform(radius=0), validate_grad=False)
    return potential_fn_gen(*model_args), postprocess_fn(*model_args)


def _evaluate_program(points, *model_args, model_fn, layout):
    """The potential and its gradient at each row of ``points`` (n, size)."""
    import jax

    potential_fn, _ = _model_functions(model_fn, model_args)
    return jax.vmap(jax.value_and_grad(lambda x: potential_fn(layout.unflatten(x))))(points)


def _nuts_program(chain_keys, starts, inverse_mass, *model_args, model_fn, layout, warmup, draws, target_accept,
                  in_turn, dense=False):
    import jax
    from numpyro.infer.hmc import hmc

    potential_fn, constrain = _model_functions(model_fn, model_args)

    def one_chain(chain_key, start):
        init_kernel, sample_kernel = hmc(potential_fn=potential_fn, algo="NUTS")
        state = init_kernel(layout.unflatten(start), num_warmup=warmup, inverse_mass_matrix=inverse_mass,
                            target_accept_prob=target_accept, max_tree_depth=10, regularize_mass_matrix=False,
                            rng_key=chain_key, dense_mass=dense)

        def step(state, _):
            state = sample_kernel(state)
            return state, (state.z, state.diverging)

        # One scan over warm-up and sampling (the kernel adapts while its counter is below
        # ``warmup``): the NUTS step is compiled once, not once per phase as two scans would.
        _, (z, diverging) = jax.lax.scan(step, state, None, length=warmup + draws)
        z, diverging = jax.tree.map(lambda a: a[warmup:], (z, diverging))
        return jax.vmap(constrain)(z), diverging

    if in_turn:
        return jax.lax.map(lambda pair: one_chain(*pair), (chain_keys, starts))
    return jax.vmap(one_chain)(chain_keys, starts)


# Newton iterations of ``laplace_start`` at most; random starting points tried at most.
START_ITERATIONS = 100
START_TRIES = 10
# Up to this many hyperparameters NUTS adapts a dense mass matrix, from H⁻¹ at the mode. At 1e6
# groups the two means correlate at -0.6: dense raised the least bulk ESS of 1000 draws from
# 811-1001 to 1014-1212 over four seeds (benchmarks/RESULTS.md). The smallest adaptation
# window (25 draws) must estimate a full-rank covariance, unregularised: hence a bound.
DENSE_MAX = 8


class Start(NamedTuple):
    """Where the chains start (``laplace_start``)."""

    points: object          # (chains, size) unconstrained starts
    covariance: object      # (size, size) the first inverse mass matrix: H⁻¹ at the mode (identity without)
    iterations: int         # Newton iterations taken
    converged: bool         # the last Newton step was under 1e-3 posterior sds on every coordinate
    laplace: bool           # False: the Hessian at the end was not positive definite

    def describe(self) -> str:
        if not self.laplace:
            return (f"no positive-definite Hessian after {self.iterations} Newton iterations: uniform(-2, 2) "
                    "points in the unconstrained space (NumPyro's default), identity inverse mass")
        return (f"Laplace: posterior mode by damped Newton from the unconstrained origin ({self.iterations} "
                f"iterations, {'converged' if self.converged else 'not converged'}), one draw of "
                "N(mode, diag H⁻¹) a chain, H⁻¹ (or its diagonal) as the first inverse mass")


def laplace_start(evaluate, size: int, rng, chains: int, *, dtype=None, iterations: int = START_ITERATIONS) -> Start:
    """The chains' starts and first inverse mass matrix from a Laplace approximation.

    ``evaluate(points)`` returns the potential and its gradient at each row of a
    ``(2·size + 1, size)`` array (one compiled call) in ``dtype`` (float64 by default). From
    the unconstrained origin (or, if the potential is not finite there, the first finite of
    uniform(-2, 2) points), damped Newton steps (Levenberg–Marquardt: a step is kept only if
    the potential falls) find the
    posterior mode, until a step is under 1e-3 posterior sds on every coordinate or after
    ``iterations``; the Hessian comes from central differences of the gradient, which works
    for any differentiable potential (custom JVPs and VJPs alike). Each chain starts one
    draw of ``N(mode, diag(H⁻¹))`` away from the mode (the mode itself where that draw's
    potential is not finite), with ``H⁻¹`` (``Start.covariance``) for its first inverse mass
    matrix; the windowed adaptation then re-estimates it from the chain's own draws. The
    chains share the mode, so their spread comes from the draws; where the Hessian at the end is not positive
    definite they start at finite uniform(-2, 2) points with the identity matrix (NumPyro's
    defaults).

    Why: the hyperparameters' posterior sds shrink like 1/√groups (~1e-4 at 10⁷ groups)
    while a prior-based start is O(1) away under an identity mass matrix. Warm-up then spent
    its windows travelling, and a window's variance estimate took in the transient: at 10⁷
    groups one chain's matrix was 160–300× off, its step 0.047 with ~35 leapfrog steps an
    iteration against 0.47 and ~6, and on the H100 a fit ended at R-hat 1.53
    (benchmarks/RESULTS.md). The work is on the host around ``evaluate``, so only that
    small program is compiled for it, and the loop stops when it has converged.
    """
    import numpy as np

    batch = 2 * size + 1
    dtype = np.float64 if dtype is None else dtype

    def values_grads(points):
        values, grads = evaluate(np.asarray(points))
        return np.asarray(values, np.float64), np.asarray(grads, np.float64)

    # Finite-difference step relative to |x|: float64 1e-5; float32 eps^(1/3) ≈ 5e-3.
    relative = 1e-5 if np.finfo(dtype).eps < 1e-10 else np.finfo(dtype).eps ** (1 / 3)

    def at(x):
        """Potential, gradient and finite-difference Hessian at x: 2·size + 1 gradients a call."""
        h = relative * np.maximum(1.0, np.abs(x))
        values, grads = values_grads(x + np.concatenate([np.zeros((1, size)), np.diag(h), -np.diag(h)]))
        hessian = (grads[1:1 + size] - grads[1 + size:]) / (2.0 * h[:, None])
        return values[0], grads[0], 0.5 * (hessian + hessian.T)

    def finite(*arrays):
        return all(np.all(np.isfinite(a)) for a in arrays)

    def random_points():
        return rng.uniform(-2.0, 2.0, (batch, size))

    def first_finite(candidates):
        values, grads = values_grads(candidates)
        ok = np.isfinite(values) & np.all(np.isfinite(grads), axis=1)
        return candidates[np.argmax(ok)] if ok.any() else None

    x = np.zeros(size)
    u, g, hessian = at(x)
    for _ in range(START_TRIES):
        if finite(u, g, hessian):
            break
        found = first_finite(random_points())
        if found is not None:
            x = found
            u, g, hessian = at(x)
    if not finite(u, g, hessian):
        raise FloatingPointError(
            f"the model's potential is not finite at the unconstrained origin nor at {START_TRIES * batch} "
            "uniform(-2, 2) points: check the priors and the data (a zero-variance outcome, an "
            "infinite value)")

    damping, taken, converged = 1e-3, 0, False
    for taken in range(1, iterations + 1):
        scale = np.maximum(np.abs(np.diag(hessian)), 1e-12)
        try:
            step = np.linalg.solve(hessian + damping * np.diag(scale), g)
        except np.linalg.LinAlgError:
            damping *= 4.0
            continue
        trial = x - step
        u_t, g_t, h_t = at(trial)
        if finite(u_t, g_t, h_t) and u_t < u:
            x, u, g, hessian = trial, u_t, g_t, h_t
            damping *= 0.3
            covariance = _positive_inverse(hessian)
            if covariance is not None and np.all(np.abs(step) < 1e-3 * np.sqrt(np.diag(covariance))):
                converged = True
                break
        else:
            damping *= 4.0
            if damping > 1e12:
                break

    covariance = _positive_inverse(hessian)
    if covariance is None:
        points = [first_finite(random_points()) for _ in range(chains)]
        points = np.stack([x if p is None else p for p in points])
        return Start(points, np.eye(size), taken, converged, laplace=False)
    jittered = x + np.sqrt(np.diag(covariance)) * rng.standard_normal((chains, size))
    ok = np.zeros(chains, bool)
    for first in range(0, chains, batch):
        part = jittered[first:first + batch]
        padded = np.concatenate([part, np.repeat(x[None], batch - len(part), 0)])
        ok[first:first + batch] = np.isfinite(values_grads(padded)[0][:len(part)])
    # A nearly singular H gives a huge diag H⁻¹: a chain whose draw is not finite starts at the mode.
    return Start(np.where(ok[:, None], jittered, x), covariance, taken, converged, laplace=True)


def _positive_inverse(hessian):
    """H⁻¹ when H is positive definite (a Cholesky factor exists) with a finite positive
    diagonal, else ``None``."""
    import numpy as np

    try:
        factor = np.linalg.cholesky(hessian)
    except np.linalg.LinAlgError:
        return None
    inverse_factor = np.linalg.inv(factor)
    covariance = inverse_factor.T @ inverse_factor
    variance = np.diag(covariance)
    return covariance if np.all(np.isfinite(covariance)) and np.all(variance > 0) else None


def _chains_in_turn(platform: str) -> bool:
    """On a CPU the chains run one after another inside the program (``lax.map``), elsewhere
    side by side (``vmap``). Vectorised chains step in lock-step, so every iteration costs the
    longest chain's tree, and on a CPU the arithmetic of the four is not free: at 10⁶ groups
    on machine A the sampling took 8.4 s vectorised and 5.8 s in turn, and compiled ~2.5 s
    faster (benchmarks/RESULTS.md). On a GPU the four chains cost about one. With more than
    one chain on a CPU each chain is its own call of the one-chain program, on its own thread
    (``run_hyper_nuts``)."""
    return platform == "cpu"
