"""posteriordb's surgical data (12 hospitals, deaths out of operations): `laplace` against
full NUTS on the same binomial hierarchy, within Monte Carlo error.

The data have no treatment, so the test runs the model layer: every hospital is a
control-arm cell (successes r, trials n) and the treated arm is empty (its effect is
prior-only). What is compared is the baseline hierarchy, logit p_j ~ N(μ_α, σ_α²) — the
classic surgical partial-pooling model — on sparse real data (hospital A: 0 of 47).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine.cells import Cells
from engine.encode import encode
from engine.infer.diagnostics import ess_bulk
from engine.models import glm
from engine.priors import Prior
from engine.spec import Spec

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "posteriordb"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/posteriordb is not present")


def surgical_problem():
    data = json.loads((DATA / "surgical_data.json").read_text())
    table = pl.DataFrame({
        "hospital": [chr(ord("A") + j) for j in range(data["N"])],
        "arm": pl.Series([0] * data["N"], dtype=pl.Int8), "n": pl.Series([1] * data["N"], dtype=pl.Int64),
        "mean": [float(r) for r in data["r"]], "m2": [0.0] * data["N"],
        "x_mean__ops": [float(n) for n in data["n"]],
    })
    cells = Cells(table, ("hospital",), ("ops",))
    priors = {"baseline_mean": Prior("normal", (-2.5, 2.0)), "effect_mean": Prior("normal", (0.0, 1.0)),
              "baseline_scale.hospital": Prior("halfnormal", (1.0,)),
              "effect_scale.hospital": Prior("halfnormal", (0.5,))}
    spec = Spec(outcome="r", treatment="arm", groups=("hospital",), family="binomial", trials="ops",
                draws=1000, warmup=1000, chains=4, seed=3)
    return glm.build(cells, encode(cells), priors, "binomial", "ops"), spec


@pytest.mark.slow
def test_surgical_laplace_matches_nuts():
    from engine.infer.laplace import fit_laplace
    from engine.infer.nuts import fit_glm_nuts

    problem, spec = surgical_problem()
    laplace = fit_laplace(problem, spec, "test")
    nuts = fit_glm_nuts(problem, spec, "test")
    for fit in (laplace, nuts):
        assert fit.diagnostics["max_rhat"] < 1.02, fit.diagnostics
    for name in ("baseline_mean", "baseline_scale.hospital"):
        a, b = laplace.hyper[name], nuts.hyper[name]
        ess_a, ess_b = ess_bulk(a), ess_bulk(b)
        se_mean = np.sqrt(a.var() / ess_a + b.var() / ess_b)
        assert abs(a.mean() - b.mean()) < 4 * se_mean, (name, a.mean(), b.mean(), se_mean)
        # MC error of an sd ≈ sd / sqrt(2 ESS) for near-normal draws.
        se_sd = np.sqrt(a.var() / (2 * ess_a) + b.var() / (2 * ess_b))
        assert abs(a.std() - b.std()) < 4 * se_sd, (name, a.std(), b.std(), se_sd)
    # The pooled mortality is about 7%: μ_α near logit(0.07) = −2.6.
    assert -3.2 < laplace.hyper["baseline_mean"].mean() < -2.2
