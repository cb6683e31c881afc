"""Reference posteriors from posteriordb (../shared/data): eight schools and Minnesota radon."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import engine
from engine.infer.diagnostics import ess_bulk

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "posteriordb"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/posteriordb is not present")


def mc_errors(draws: np.ndarray, ess: float) -> tuple[float, float]:
    """Monte Carlo standard errors of the mean and of the sd, from an effective sample size."""
    centred = draws - draws.mean()
    sd = draws.std()
    se_mean = sd / np.sqrt(ess)
    # Delta method: sd = sqrt(E[(x-μ)²]); se(E[(x-μ)²]) = sd((x-μ)²)/sqrt(ess).
    se_sd = (centred**2).std() / (2 * sd * np.sqrt(ess))
    return se_mean, se_sd


@pytest.fixture(scope="module")
def eight_schools():
    data = json.loads((DATA / "eight_schools.json").read_text())
    table = pl.DataFrame({"school": [f"school-{j + 1}" for j in range(data["J"])],
                          "y": data["y"], "sigma": data["sigma"]})
    result = engine.fit(table, estimate="y", stderr="sigma", groups=["school"], seed=5,
                        priors={"effect_mean": "normal(0,5)", "effect_scale": "halfcauchy(5)"})
    chains = json.loads((DATA / "eight_schools-eight_schools_noncentered.json").read_text())
    info = json.loads((DATA / "eight_schools-eight_schools_noncentered.info.json").read_text())
    names = info["diagnostics"]["diagnostic_information"]["names"]
    ref_ess = dict(zip(names, info["diagnostics"]["effective_sample_size_bulk"]))
    reference = {name: np.concatenate([c[name] for c in chains]) for name in names}
    return result, reference, ref_ess


def agree(ours: np.ndarray, ours_ess: float, ref: np.ndarray, ref_ess: float, label: str):
    a_mean, a_sd = mc_errors(ours, ours_ess)
    b_mean, b_sd = mc_errors(ref, ref_ess)
    assert abs(ours.mean() - ref.mean()) < 4 * np.hypot(a_mean, b_mean), (label, ours.mean(), ref.mean())
    assert abs(ours.std() - ref.std()) < 4 * np.hypot(a_sd, b_sd), (label, ours.std(), ref.std())


@pytest.mark.parametrize("ours,theirs", [("effect_mean", "mu"), ("effect_scale.school", "tau")])
def test_eight_schools_hyperparameters(eight_schools, ours, theirs):
    result, reference, ref_ess = eight_schools
    draws = result.posterior.hyper[ours]
    ess = float(ess_bulk(draws[..., None])[0])
    agree(draws.reshape(-1), ess, reference[theirs], ref_ess[theirs], ours)


def test_eight_schools_school_effects(eight_schools):
    """Group summaries are Rao-Blackwellised; their MC error is at most that of raw draws
    with the hyperparameters' ESS, which bounds it here."""
    result, reference, ref_ess = eight_schools
    ess = min(result.summary["diagnostics"]["min_ess_bulk"], 4000)
    effects = result.effects("school")
    for j in range(8):
        ref = reference[f"theta[{j + 1}]"]
        row = effects.filter(pl.col("group") == f"school-{j + 1}")
        se_mean = np.hypot(ref.std() / np.sqrt(ess), ref.std() / np.sqrt(ref_ess[f"theta[{j + 1}]"]))
        _, se_sd_ref = mc_errors(ref, ref_ess[f"theta[{j + 1}]"])
        _, se_sd_ours = mc_errors(ref, ess)  # our draws' kurtosis ≈ the reference's
        assert abs(row["mean"].item() - ref.mean()) < 4 * se_mean, (j, row["mean"].item(), ref.mean())
        assert abs(row["sd"].item() - ref.std()) < 4 * np.hypot(se_sd_ref, se_sd_ours), (j, row["sd"].item())


@pytest.mark.slow
def test_radon_exact_and_nuts_agree():
    """radon_variable_intercept_slope with posteriordb's priors: the collapsed and joint models agree."""
    data = json.loads((DATA / "radon_mn.json").read_text())
    rows = pl.DataFrame({"county": data["county_idx"], "floor": data["floor_measure"], "log_radon": data["log_radon"]})
    priors = {"effect_mean": "normal(0,10)", "baseline_mean": "normal(0,10)", "effect_scale": "halfnormal(1)",
              "baseline_scale": "halfnormal(1)", "noise": "halfnormal(1)"}
    kwargs = dict(outcome="log_radon", treatment="floor", groups=["county"], priors=priors, draws=1000,
                  warmup=1000, chains=2)
    exact = engine.fit(rows, method="exact", seed=1, **kwargs)
    nuts = engine.fit(rows, method="nuts", seed=2, **kwargs)
    for name in ("baseline_mean", "effect_mean", "noise", "baseline_scale.county", "effect_scale.county"):
        a, b = exact.posterior.hyper[name], nuts.posterior.hyper[name]
        ess_a, ess_b = (float(ess_bulk(x[..., None])[0]) for x in (a, b))
        a_mean, _ = mc_errors(a.reshape(-1), ess_a)
        b_mean, _ = mc_errors(b.reshape(-1), ess_b)
        assert abs(a.mean() - b.mean()) < 4 * np.hypot(a_mean, b_mean), (name, a.mean(), b.mean())
    both = exact.effects().join(nuts.effects(), on=["level", "group"], suffix="_nuts")
    z = (both["mean"] - both["mean_nuts"]) / (both["sd_nuts"] * np.sqrt(2 / 200))
    assert (z.abs() < 4.5).all()
