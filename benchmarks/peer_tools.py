"""The tools a user would pick instead of causal-engine, each fitting the same experiment.

Every adapter takes an :class:`Experiment` (rows as arrays, the engine's default priors) and
the sampler settings, and returns a :class:`GroupFit`: each group's effect (posterior mean
and 90% interval, or estimate ± 1.645 standard errors), the effect draws by chain when the
tool samples, and its own timings. The model is the engine's, written the way each tool's
users write it: non-centred, the likelihood over rows (not cells), one random intercept and
one random treatment effect per group.

    Gaussian: y ~ N(α_g + τ_g·t, σ²)            Binary: y ~ Bernoulli(logit⁻¹(α_g + τ_g·t))
    α_g = μ_α + σ_α·z_α,g,  τ_g = μ_τ + σ_τ·z_τ,g,  z ~ N(0, 1)

Only ``peers.py --child`` imports this module, one tool per process, so each tool's imports
and memory stay in its own process. Timings: ``wall_s`` runs from building the model (data
already in memory, the tool imported) to draws in hand; ``compile_s`` is the part of it the
tool spends building and compiling (how each tool measures it is in ``compile_note``).
"""
from __future__ import annotations

import time
import warnings
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

INTERVAL = 0.9
Z_INTERVAL = NormalDist().inv_cdf(0.5 + INTERVAL / 2)   # 1.645: estimate ± z·se is a 90% interval


class Experiment(NamedTuple):
    family: str             # "gaussian" or "binary"
    y: np.ndarray           # (rows,) float64 (Gaussian) or int64 0/1 (binary)
    treated: np.ndarray     # (rows,) float64 0/1
    group: np.ndarray       # (rows,) int64, 0 .. groups-1
    groups: int
    priors: dict            # name -> [family, [args]], the engine's defaults for these data


class GroupFit(NamedTuple):
    effect: dict | None         # {"mean", "lower", "upper"}: (groups,) on the link scale (Gaussian: difference in means)
    outcome: dict | None        # the same for the risk difference (binary only)
    effect_draws: np.ndarray | None   # (chains, draws, groups) link-scale effect draws, for ESS and R-hat
    wall_s: float
    compile_s: float | None
    info: dict                  # version, compile_note, priors, divergences, tool diagnostics


# --- shared pieces ------------------------------------------------------------------------


def summarise_draws(draws: np.ndarray) -> dict:
    """Posterior mean and central 90% interval of (chains, draws, groups) draws."""
    flat = draws.reshape(-1, draws.shape[-1])
    lower, upper = np.quantile(flat, [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2], axis=0)
    return {"mean": flat.mean(axis=0), "lower": lower, "upper": upper}


def normal_interval(mean: np.ndarray, se: np.ndarray) -> dict:
    return {"mean": mean, "lower": mean - Z_INTERVAL * se, "upper": mean + Z_INTERVAL * se}


def risk_difference(baseline: np.ndarray, effect: np.ndarray) -> np.ndarray:
    """σ(α + τ) − σ(α), elementwise: the risk difference of a group with log odds α, odds ratio e^τ."""
    def inverse_logit(x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))   # stable for large |x|

    return inverse_logit(baseline + effect) - inverse_logit(baseline)


def sampled_fit(experiment: Experiment, hyper: dict, baseline_z, effect_z, *, wall_s, compile_s, info) -> GroupFit:
    """A GroupFit from the non-centred draws of a sampler, each (chains, draws[, groups])."""
    effect = hyper["effect_mean"][..., None] + hyper["effect_scale"][..., None] * effect_z
    outcome = None
    if experiment.family == "binary":
        baseline = hyper["baseline_mean"][..., None] + hyper["baseline_scale"][..., None] * baseline_z
        outcome = summarise_draws(risk_difference(baseline, effect))
    return GroupFit(summarise_draws(effect), outcome, effect, wall_s, compile_s, info)


def prior_args(experiment: Experiment, name: str, family: str) -> list[float]:
    """The arguments of one of the engine's default priors, checking it has the expected form."""
    found, args = experiment.priors[name]
    if found != family:
        raise ValueError(f"prior {name}: the adapters write {family} priors, found {found}{tuple(args)}")
    return list(args)


HYPER = ("baseline_mean", "effect_mean", "baseline_scale", "effect_scale")


def hyper_names(experiment: Experiment) -> tuple[str, ...]:
    return HYPER + (("noise",) if experiment.family == "gaussian" else ())


def prior_text(experiment: Experiment) -> dict:
    return {name: f"{experiment.priors[name][0]}({', '.join(f'{a:.6g}' for a in experiment.priors[name][1])})"
            for name in hyper_names(experiment)}


class JaxCompileClock:
    """Seconds JAX spends tracing, lowering and compiling, from its monitoring events.

    The events nest (a jitted function traced inside another), so the total is the length
    of the union of their time spans, not their sum.
    """

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax.monitoring

        self.spans: list[tuple[float, float]] = []
        jax.monitoring.register_event_time_span_listener(self._record)

    def _record(self, event: str, start: float, end: float, **_kwargs) -> None:
        if event in self.EVENTS:
            self.spans.append((start, end))

    def seconds(self) -> float:
        total, reach = 0.0, -np.inf
        for start, end in sorted(self.spans):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


# --- causal-engine ------------------------------------------------------------------------


KEEP_BYTES = 2**30


def fit_engine(experiment: Experiment, settings: dict, method: str) -> GroupFit:
    """``engine.fit`` on the rows as a Polars frame, the group codes as keys."""
    from importlib.metadata import version

    import engine
    import polars as pl

    clock = JaxCompileClock()
    rows = pl.DataFrame({"y": experiment.y, "treated": experiment.treated.astype(np.int8),
                         "group": experiment.group})
    family = "gaussian" if experiment.family == "gaussian" else "bernoulli"
    # The ESS below is computed over the retained joint draws: keep every draw where they fit
    # KEEP_BYTES (float32), so that thinning does not understate it; past that, evenly thinned.
    total = settings["draws"] * settings["chains"]
    keep = int(min(total, max(KEEP_BYTES // (4 * experiment.groups), 1)))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # short test chains warn; the diagnostics are recorded below
        result = engine.fit(rows, outcome="y", treatment="treated", groups=["group"], family=family,
                            method=method, draws=settings["draws"], warmup=settings["warmup"],
                            chains=settings["chains"], seed=settings["seed"], keep_draws=keep)
    wall_s = time.perf_counter() - started

    table = result.effects("group")
    order = np.argsort(table["group"].cast(pl.Int64).to_numpy())
    if len(order) != experiment.groups:
        raise RuntimeError(f"engine returned {len(order)} groups, expected {experiment.groups}")

    def column_set(prefix):
        return {k: table[f"{prefix}{k}"].to_numpy()[order] for k in ("mean", "lower", "upper")}

    glm = experiment.family != "gaussian"
    posterior = result.posterior
    summary = (posterior.link_groups if glm else posterior.groups)[0]
    chains = posterior.ate.shape[0]
    draws = by_chain(summary.draws, summary.draw_index, chains, posterior.ate.shape[1])
    spec_priors = result.provenance.get("spec", {}).get("priors", {})
    info = {"version": version("causal-engine"),
            "compile_note": "JAX tracing + lowering + compiling inside engine.fit (jax.monitoring spans)",
            "engine_summary": {"diagnostics": result.summary["diagnostics"], "timings": result.summary["timings"],
                               "method": result.summary["method"]},
            "divergences": result.summary["diagnostics"].get("divergences"),
            "priors": spec_priors,
            "ess_note": f"over the {draws.shape[1]} retained draws per chain" if summary.quantile_draws
            < chains * posterior.ate.shape[1] else ""}
    return GroupFit(column_set("link_" if glm else ""), column_set("") if glm else None,
                    draws[..., order], wall_s, clock.seconds(), info)


def by_chain(kept: np.ndarray, draw_index: np.ndarray, chains: int, per_chain: int) -> np.ndarray:
    """Retained joint draws (kept, groups), positions in the flattened (chain, draw) axis →
    (chains, k, groups), k the fewest any chain kept (the engine thins evenly past 256 MB)."""
    chain_of = np.asarray(draw_index) // per_chain
    counts = np.bincount(chain_of, minlength=chains)
    k = int(counts.min())
    return np.stack([kept[chain_of == c][:k] for c in range(chains)]).astype(np.float64)


# --- NumPyro, written as a user writes it ---------------------------------------------------


def fit_numpyro(experiment: Experiment, settings: dict) -> GroupFit:
    """Full NUTS in NumPyro, the likelihood over rows; float64 and vectorised chains as the engine runs."""
    import jax
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    clock = JaxCompileClock()
    gaussian = experiment.family == "gaussian"

    def prior(name):
        if name in ("baseline_mean", "effect_mean"):
            return dist.Normal(*prior_args(experiment, name, "normal"))
        return dist.HalfNormal(*prior_args(experiment, name, "halfnormal"))

    def model(group, treated, y):
        hyper = {name: numpyro.sample(name, prior(name)) for name in hyper_names(experiment)}
        with numpyro.plate("groups", experiment.groups):
            baseline_z = numpyro.sample("baseline_z", dist.Normal(0.0, 1.0))
            effect_z = numpyro.sample("effect_z", dist.Normal(0.0, 1.0))
        baseline = hyper["baseline_mean"] + hyper["baseline_scale"] * baseline_z
        effect = hyper["effect_mean"] + hyper["effect_scale"] * effect_z
        eta = baseline[group] + effect[group] * treated
        with numpyro.plate("rows", y.shape[0]):
            if gaussian:
                numpyro.sample("y", dist.Normal(eta, hyper["noise"]), obs=y)
            else:
                numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)

    started = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=settings["warmup"], num_samples=settings["draws"],
                num_chains=settings["chains"], chain_method="vectorized", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(settings["seed"]), experiment.group, experiment.treated,
             experiment.y.astype(np.float64) if gaussian else experiment.y, extra_fields=("diverging",))
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    wall_s = time.perf_counter() - started
    info = {"version": numpyro.__version__, "priors": prior_text(experiment),
            "compile_note": "JAX tracing + lowering + compiling (jax.monitoring spans)",
            "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()),
            "settings": "NUTS defaults (target accept 0.8), chains vectorised, float64"}
    return sampled_fit(experiment, samples, samples["baseline_z"], samples["effect_z"], wall_s=wall_s,
                       compile_s=clock.seconds(), info=info)


# --- PyMC, and PyMC through nutpie -----------------------------------------------------------


def pymc_model(experiment: Experiment):
    import pymc as pm

    with pm.Model() as model:
        hyper = {}
        for name in hyper_names(experiment):
            if name in ("baseline_mean", "effect_mean"):
                mu, sigma = prior_args(experiment, name, "normal")
                hyper[name] = pm.Normal(name, mu=mu, sigma=sigma)
            else:
                hyper[name] = pm.HalfNormal(name, sigma=prior_args(experiment, name, "halfnormal")[0])
        baseline_z = pm.Normal("baseline_z", 0.0, 1.0, shape=experiment.groups)
        effect_z = pm.Normal("effect_z", 0.0, 1.0, shape=experiment.groups)
        baseline = hyper["baseline_mean"] + hyper["baseline_scale"] * baseline_z
        effect = hyper["effect_mean"] + hyper["effect_scale"] * effect_z
        eta = baseline[experiment.group] + effect[experiment.group] * experiment.treated
        if experiment.family == "gaussian":
            pm.Normal("y", mu=eta, sigma=hyper["noise"], observed=experiment.y)
        else:
            pm.Bernoulli("y", logit_p=eta, observed=experiment.y)
    return model


def fit_from_idata(experiment: Experiment, idata, *, wall_s, compile_s, info) -> GroupFit:
    posterior = idata.posterior
    hyper = {name: posterior[name].values for name in HYPER}
    info["divergences"] = int(idata.sample_stats["diverging"].values.sum())
    return sampled_fit(experiment, hyper, posterior["baseline_z"].values, posterior["effect_z"].values,
                       wall_s=wall_s, compile_s=compile_s, info=info)


def fit_pymc(experiment: Experiment, settings: dict) -> GroupFit:
    """``pm.sample`` with its defaults (NUTS, jitter+adapt_diag, one process per core)."""
    import pymc as pm

    started = time.perf_counter()
    model = pymc_model(experiment)
    with model:
        idata = pm.sample(draws=settings["draws"], tune=settings["warmup"], chains=settings["chains"],
                          random_seed=settings["seed"], progressbar=False, compute_convergence_checks=False)
    wall_s = time.perf_counter() - started
    sampling_s = idata.posterior.attrs.get("sampling_time")
    info = {"version": pm.__version__, "priors": prior_text(experiment),
            "compile_note": "wall minus pm.sample's own sampling_time: building the model and the NUTS "
                            "step (compiling logp and gradient), initialisation, packaging draws",
            "settings": "pm.sample defaults (target accept 0.8)"}
    compile_s = wall_s - float(sampling_s) if sampling_s is not None else None
    return fit_from_idata(experiment, idata, wall_s=wall_s, compile_s=compile_s, info=info)


def fit_nutpie(experiment: Experiment, settings: dict) -> GroupFit:
    """The same PyMC model compiled by ``nutpie.compile_pymc_model`` (numba) and sampled by nutpie."""
    import nutpie

    started = time.perf_counter()
    compiled = nutpie.compile_pymc_model(pymc_model(experiment))
    compile_s = time.perf_counter() - started
    idata = nutpie.sample(compiled, draws=settings["draws"], tune=settings["warmup"],
                          chains=settings["chains"], seed=settings["seed"], progress_bar=False)
    wall_s = time.perf_counter() - started
    info = {"version": nutpie.__version__, "priors": prior_text(experiment),
            "compile_note": "building the PyMC model + nutpie.compile_pymc_model (numba backend)",
            "settings": "nutpie defaults"}
    return fit_from_idata(experiment, idata, wall_s=wall_s, compile_s=compile_s, info=info)


# --- Stan (PyStan 3: its httpstan wheel bundles Stan and compiles with the local C++ compiler) ---

STAN_PROGRAM = """
data {
  int<lower=1> N;
  int<lower=1> G;
  array[N] int<lower=1, upper=G> group;
  vector[N] treated;
  OUTCOME_DECLARATION
  vector[2] baseline_mean_prior;        // normal(location, scale)
  vector[2] effect_mean_prior;
  real<lower=0> baseline_scale_prior;   // half-normal(scale)
  real<lower=0> effect_scale_prior;
  NOISE_PRIOR_DECLARATION
}
parameters {
  real baseline_mean;
  real effect_mean;
  real<lower=0> baseline_scale;
  real<lower=0> effect_scale;
  NOISE_DECLARATION
  vector[G] baseline_z;
  vector[G] effect_z;
}
model {
  vector[G] baseline = baseline_mean + baseline_scale * baseline_z;
  vector[G] effect = effect_mean + effect_scale * effect_z;
  baseline_mean ~ normal(baseline_mean_prior[1], baseline_mean_prior[2]);
  effect_mean ~ normal(effect_mean_prior[1], effect_mean_prior[2]);
  baseline_scale ~ normal(0, baseline_scale_prior);   // half-normal through the lower bound
  effect_scale ~ normal(0, effect_scale_prior);
  baseline_z ~ std_normal();
  effect_z ~ std_normal();
  LIKELIHOOD
}
"""

STAN_FAMILY = {
    "gaussian": {"OUTCOME_DECLARATION": "vector[N] y;",
                 "NOISE_PRIOR_DECLARATION": "real<lower=0> noise_prior;",
                 "NOISE_DECLARATION": "real<lower=0> noise;",
                 "LIKELIHOOD": "noise ~ normal(0, noise_prior);\n"
                               "  y ~ normal(baseline[group] + effect[group] .* treated, noise);"},
    "binary": {"OUTCOME_DECLARATION": "array[N] int<lower=0, upper=1> y;",
               "NOISE_PRIOR_DECLARATION": "", "NOISE_DECLARATION": "",
               "LIKELIHOOD": "y ~ bernoulli_logit(baseline[group] + effect[group] .* treated);"},
}


def stan_program(family: str) -> str:
    program = STAN_PROGRAM
    for placeholder, text in STAN_FAMILY[family].items():
        program = program.replace(placeholder, text)
    return program


def fit_stan(experiment: Experiment, settings: dict) -> GroupFit:
    """Stan's NUTS (diag_e, target accept 0.8) through PyStan 3; build = compile + load data."""
    import httpstan
    import stan

    gaussian = experiment.family == "gaussian"
    data = {"N": int(experiment.y.shape[0]), "G": experiment.groups, "group": (experiment.group + 1).tolist(),
            "treated": experiment.treated.tolist(), "y": experiment.y.tolist(),
            "baseline_mean_prior": prior_args(experiment, "baseline_mean", "normal"),
            "effect_mean_prior": prior_args(experiment, "effect_mean", "normal"),
            "baseline_scale_prior": prior_args(experiment, "baseline_scale", "halfnormal")[0],
            "effect_scale_prior": prior_args(experiment, "effect_scale", "halfnormal")[0]}
    if gaussian:
        data["noise_prior"] = prior_args(experiment, "noise", "halfnormal")[0]
    started = time.perf_counter()
    posterior = stan.build(stan_program(experiment.family), data=data, random_seed=settings["seed"])
    compile_s = time.perf_counter() - started
    fit = posterior.sample(num_chains=settings["chains"], num_samples=settings["draws"],
                           num_warmup=settings["warmup"])
    wall_s = time.perf_counter() - started

    def chains_draws(name):
        """PyStan's (dims..., draws·chains), chain fastest → (chains, draws[, dims])."""
        values = np.asarray(fit[name])
        values = values.reshape(values.shape[0], settings["draws"], settings["chains"])
        return np.moveaxis(values, (2, 1), (0, 1)) if values.shape[0] > 1 else values[0].T

    hyper = {name: chains_draws(name) for name in HYPER}
    info = {"version": f"pystan {stan.__version__ if hasattr(stan, '__version__') else ''} / httpstan "
                       f"{httpstan.__version__}", "priors": prior_text(experiment),
            "compile_note": "stan.build: C++ compile of the model (fresh cache) and loading the data; the "
                            "peak memory is the compiler's",
            "divergences": int(np.asarray(fit["divergent__"]).sum()),
            "settings": "Stan defaults (NUTS diag_e, target accept 0.8)"}
    return sampled_fit(experiment, hyper, chains_draws("baseline_z"), chains_draws("effect_z"),
                       wall_s=wall_s, compile_s=compile_s, info=info)


# --- statsmodels ------------------------------------------------------------------------


def fit_statsmodels(experiment: Experiment, settings: dict) -> GroupFit:
    """Gaussian: MixedLM (REML), random intercept and treatment slope per group. Binary:
    BinomialBayesMixedGLM (variational Bayes), the same two random effects per group."""
    if experiment.family == "gaussian":
        return _mixedlm(experiment)
    return _bayes_mixed_glm(experiment)


def _mixedlm(experiment: Experiment) -> GroupFit:
    import statsmodels
    import statsmodels.api as sm

    design = np.column_stack([np.ones_like(experiment.treated), experiment.treated])
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sm.MixedLM(experiment.y, design, groups=experiment.group, exog_re=design).fit(reml=True)
    wall_s = time.perf_counter() - started
    # The group's effect is the fixed slope plus its predicted random slope (BLUP); its variance
    # is the fixed slope's plus the BLUP's conditional variance (their covariance and the
    # uncertainty of the variance components ignored, as is usual with these intervals).
    slope, slope_var = result.fe_params[1], result.cov_params()[1, 1]
    keys = sorted(result.random_effects)
    blup = np.array([np.asarray(result.random_effects[k])[1] for k in keys])
    blup_var = np.array([np.asarray(result.random_effects_cov[k])[1, 1] for k in keys])
    mean, se = np.full(experiment.groups, np.nan), np.full(experiment.groups, np.nan)
    index = np.asarray(keys, dtype=np.int64)
    mean[index], se[index] = slope + blup, np.sqrt(slope_var + blup_var)
    info = {"version": statsmodels.__version__, "compile_note": "nothing to compile",
            "priors": "none (REML point estimates of the variance components)",
            "converged": bool(result.converged),
            "warnings": sorted({str(w.message)[:120] for w in caught})[:5],
            "interval": "fixed slope + BLUP ± 1.645·sqrt(Var(slope) + Var(BLUP | y))"}
    return GroupFit(normal_interval(mean, se), None, None, wall_s, 0.0, info)


def _bayes_mixed_glm(experiment: Experiment) -> GroupFit:
    import statsmodels
    from scipy import sparse
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    rows, groups = np.arange(experiment.y.shape[0]), experiment.groups
    design = np.column_stack([np.ones_like(experiment.treated), experiment.treated])
    # Random effects as sparse indicator columns: a dense one-hot matrix is rows × 2·groups.
    intercepts = sparse.csr_matrix((np.ones(rows.shape[0]), (rows, experiment.group)), shape=(rows.shape[0], groups))
    slopes = sparse.csr_matrix((experiment.treated, (rows, experiment.group)), shape=(rows.shape[0], groups))
    ident = np.concatenate([np.zeros(groups, dtype=np.int64), np.ones(groups, dtype=np.int64)])
    fe_prior_sd = 2.5
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = BinomialBayesMixedGLM(experiment.y.astype(np.float64), design,
                                      sparse.hstack([intercepts, slopes]).tocsr(), ident,
                                      vcp_p=1.0, fe_p=fe_prior_sd)
        result = model.fit_vb()
    wall_s = time.perf_counter() - started
    # Mean-field posterior: fixed effects and random effects are independent normals.
    fe_mean, fe_sd = np.asarray(result.fe_mean), np.asarray(result.fe_sd)
    re_mean, re_sd = np.asarray(result.vc_mean), np.asarray(result.vc_sd)
    effect_mean = fe_mean[1] + re_mean[groups:]
    effect_sd = np.sqrt(fe_sd[1] ** 2 + re_sd[groups:] ** 2)
    rng = np.random.default_rng(0)
    draws = 1000
    baseline = fe_mean[0] + re_mean[:groups] + np.sqrt(fe_sd[0] ** 2 + re_sd[:groups] ** 2) * rng.standard_normal((draws, groups))
    effect = effect_mean + effect_sd * rng.standard_normal((draws, groups))
    outcome = summarise_draws(risk_difference(baseline, effect)[None])
    info = {"version": statsmodels.__version__, "compile_note": "nothing to compile",
            "priors": f"statsmodels' form: fixed effects normal(0, {fe_prior_sd}); log random-effect sd "
                      "normal(0, 1) (no half-normal scale priors; the engine's do not map exactly)",
            "warnings": sorted({str(w.message)[:120] for w in caught})[:5],
            "interval": "fixed slope + random slope, mean-field normal posterior; risk difference from "
                        f"{draws} draws of it"}
    return GroupFit(normal_interval(effect_mean, effect_sd), outcome, None, wall_s, 0.0, info)


# --- no pooling: fixed effects -----------------------------------------------------------


def fit_pyfixest(experiment: Experiment, settings: dict) -> GroupFit:
    """``feols("y ~ i(g, treated) | g")``: group fixed effects and one treatment effect per
    group, iid standard errors; a linear probability model for the binary outcome (so it is
    scored on the risk difference). Groups with rows in one arm only have no estimate."""
    import pandas as pd
    import pyfixest as pf

    frame = pd.DataFrame({"y": experiment.y.astype(np.float64), "treated": experiment.treated,
                          "g": experiment.group})
    formula = "y ~ i(g, treated) | g"
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "variables dropped due to multicollinearity": one-arm groups
        pf.feols(formula, data=_warmup_frame(), vcov="iid")
        compile_s = time.perf_counter() - started
        tidy = pf.feols(formula, data=frame, vcov="iid").tidy()
    wall_s = time.perf_counter() - started
    index = np.array([int(name.split("::")[1].split(":")[0]) for name in tidy.index])
    mean, se = np.full(experiment.groups, np.nan), np.full(experiment.groups, np.nan)
    mean[index], se[index] = tidy["Estimate"].to_numpy(), tidy["Std. Error"].to_numpy()
    estimates = normal_interval(mean, se)
    info = {"version": pf.__version__, "priors": "none (no pooling)",
            "compile_note": "a first fit on 40 rows (numba JIT warm-up)",
            "estimable_groups": int(np.isfinite(mean).sum()),
            "interval": "estimate ± 1.645 iid standard errors"}
    if experiment.family == "gaussian":
        return GroupFit(estimates, None, None, wall_s, compile_s, info)
    info["model"] = "linear probability model: per-group risk difference"
    return GroupFit(None, estimates, None, wall_s, compile_s, info)


def _warmup_frame():
    import pandas as pd

    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(4), 10)
    treated = np.tile([0.0, 1.0], 20)
    return pd.DataFrame({"y": rng.standard_normal(40) + treated, "treated": treated, "g": g})
