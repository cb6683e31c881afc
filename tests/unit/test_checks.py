"""Trust checks: sample ratio mismatch, covariate balance, the covariate profile, design_share.

These work on cell tables only: no model is compiled here.
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import engine
from engine import checks, validate
from engine.cli import main
from engine.reduce import reduce
from engine.spec import Spec


def cells_and_checked(rows: pl.DataFrame, covariates=("pre",), groups=("group",)):
    spec = Spec(outcome="y", treatment="treated", groups=tuple(groups), covariates=tuple(covariates))
    checked = validate.check(validate.resolve_source(rows), spec)
    return reduce(checked, spec), checked, spec


def test_chi2_p_value_matches_known_quantiles():
    # χ²₁ quantiles: 3.841 at 5%, 6.635 at 1%, 10.828 at 0.1%.
    for quantile, p in ((3.841459, 0.05), (6.634897, 0.01), (10.827566, 0.001)):
        # n = 1 and design share ½ give χ² = 4 (t − ½)²; choose counts that hit the quantile.
        n = 10_000
        treated = n / 2 + math.sqrt(quantile * n / 4)
        chi2, p_value = checks.chi2_p_value(np.array([treated]), np.array([n]), 0.5)
        assert chi2[0] == pytest.approx(quantile, rel=1e-9)
        assert p_value[0] == pytest.approx(p, rel=1e-5)


def test_sample_ratio_flags_a_mismatch_and_not_a_fair_split():
    fair = checks.sample_ratio(5_050, 4_950, 0.5)
    assert not fair["flag"] and fair["observed_share"] == pytest.approx(0.495)
    # 52/48 in 10,000 rows: χ² = 16, p ≈ 6e-5 — a textbook SRM.
    skewed = checks.sample_ratio(4_800, 5_200, 0.5)
    assert skewed["flag"] and skewed["chi2"] == pytest.approx(16.0) and skewed["p_value"] < 1e-4
    # The same counts are fine when the design assigned 52% to treatment.
    assert not checks.sample_ratio(4_800, 5_200, 0.52)["flag"]


def test_trust_checks_on_rows_with_lost_treated_rows():
    rows = engine.simulate(rows=6_000, groups=10, seed=3, covariate=True).rows
    # Lose 30% of the treated rows of one large group: an SRM overall and in that group.
    biggest = rows.group_by("group").len().sort("len")["group"][-1]
    rng = np.random.default_rng(0)
    lose = (pl.col("group") == biggest) & (pl.col("treated") == 1) & pl.Series(rng.random(rows.height) < 0.3)
    cells, _, spec = cells_and_checked(rows.filter(~lose))
    report = checks.trust_checks(cells, spec)
    srm = report["sample_ratio"]
    assert srm["flag"] and not report["ok"]
    assert srm["groups_flagged"] >= 1 and srm["worst_groups"][0]["group"] == biggest
    assert any("sample ratio mismatch" in m for m in report["messages"])
    assert report["placebo"]["status"] == "not run" and "refute" in report["placebo"]["how"]

    clean, _, spec = cells_and_checked(rows)
    assert checks.trust_checks(clean, spec)["ok"]


def test_balance_smd_equals_the_rows_computation():
    rng = np.random.default_rng(11)
    rows = engine.simulate(rows=3_000, groups=15, seed=4, covariate=True).rows
    # Make 'pre' imbalanced: treated rows read higher by 0.3 sd.
    rows = rows.with_columns(pl.col("pre") + 0.6 * pl.col("treated"),
                             other=pl.Series(rng.standard_normal(rows.height) * 5 + 1))
    cells, _, _ = cells_and_checked(rows, covariates=("pre", "other"))
    report = checks.balance(cells)
    for x in ("pre", "other"):
        t = rows.filter(pl.col("treated") == 1)[x].to_numpy()
        c = rows.filter(pl.col("treated") == 0)[x].to_numpy()
        smd = (t.mean() - c.mean()) / math.sqrt((t.var() + c.var()) / 2)
        assert report["covariates"][x]["smd"] == pytest.approx(smd, rel=1e-9, abs=1e-12)
        assert report["covariates"][x]["z"] == pytest.approx(smd / math.sqrt(1 / t.size + 1 / c.size), rel=1e-9)
    assert report["covariates"]["pre"]["flag"] and abs(report["covariates"]["pre"]["z"]) > 3
    assert not report["covariates"]["other"]["flag"]


def test_covariate_profile_has_the_rows_range():
    rows = engine.simulate(rows=1_000, groups=8, seed=5, covariate=True).rows
    cells, checked, _ = cells_and_checked(rows)
    profile = checks.covariate_profile(cells, checked)["pre"]
    x = rows["pre"].to_numpy()
    assert profile["mean"] == pytest.approx(x.mean(), rel=1e-9)
    assert profile["sd"] == pytest.approx(x.std(), rel=1e-9)
    assert (profile["min"], profile["max"]) == (x.min(), x.max())
    # A fit from cell tables has no rows: no range.
    assert checks.covariate_profile(cells, None)["pre"]["min"] is None


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, float("nan"), True])
def test_design_share_must_be_a_probability(share):
    with pytest.raises(engine.SpecError, match="design_share"):
        Spec(outcome="y", treatment="t", design_share=share)


def test_cli_refuses_a_bad_design_share(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    engine.simulate(rows=200, groups=5, seed=1).rows.write_parquet(path)
    out = tmp_path / "out"
    code = main(["fit", str(path), "--outcome", "y", "--treatment", "treated", "--design-share", "1.5",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "design_share 1.5 is outside (0, 1)" in err and not out.exists()
