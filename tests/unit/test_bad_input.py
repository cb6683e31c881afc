"""Bad input: a typed error naming the problem, exit code 2, nothing written.

Every check here fires before inference, so these tests never compile a model.
"""
from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

import engine
from engine.cli import main
from engine.errors import DataError, SchemaError, SpecError
from tests.helpers import small_rows


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.parquet"
    small_rows().write_parquet(path)
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def fit_args(data, out, *extra):
    return ["fit", data, "--outcome", "y", "--treatment", "treated", "--group", "group",
            "--out", out, *extra]


def assert_refused(tmp_path, capsys, data, *extra, match):
    out = tmp_path / "out"
    code, err = run_cli(fit_args(data, out, *extra), capsys)
    assert code == 2, err
    assert match in err, err
    assert err.count("\n") == 1, "one clear message on stderr"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temporary leftovers"


def test_missing_column(tmp_path, capsys, rows_file):
    assert_refused(tmp_path, capsys, rows_file, "--covariate", "nope",
                   match="covariate column 'nope' not found")
    with pytest.raises(SchemaError, match="outcome column 'yy' not found"):
        engine.fit(pl.read_parquet(rows_file), outcome="yy", treatment="treated")


def test_outcome_not_numeric(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    small_rows().with_columns(pl.col("y").cast(pl.String) + "kg").write_csv(path)
    assert_refused(tmp_path, capsys, path, match="outcome column 'y' has type String; expected a number")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_outcome_refused_then_dropped(tmp_path, capsys, bad):
    frame = small_rows().with_row_index().with_columns(
        pl.when(pl.col("index") < 3).then(bad).otherwise(pl.col("y")).alias("y")).drop("index")
    path = tmp_path / "rows.parquet"
    frame.write_parquet(path)
    assert_refused(tmp_path, capsys, path, match="3 missing, NaN or infinite")
    with pytest.raises(DataError, match="--drop-missing"):
        engine.fit(frame, outcome="y", treatment="treated", groups=["group"])
    # With drop_missing the rows go, and provenance counts them.
    from engine import validate
    from engine.spec import Spec
    spec = Spec(outcome="y", treatment="treated", groups=("group",), drop_missing=True)
    checked = validate.check(validate.resolve_source(frame), spec)
    assert checked.n_rows_read == frame.height
    assert checked.n_rows_used == frame.height - 3
    assert list(checked.dropped.values()) == [3]


def test_treatment_with_one_value(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    small_rows().with_columns(treated=pl.lit(1)).write_parquet(path)
    assert_refused(tmp_path, capsys, path, match="has 1 distinct value(s)")


def test_treatment_with_three_values(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    frame = small_rows().with_row_index()
    frame.with_columns(treated=(pl.col("index") % 3).cast(pl.Int64)).drop("index").write_parquet(path)
    assert_refused(tmp_path, capsys, path, match="has 3 distinct value(s) (0, 1, 2); expected 2")


def test_string_treatment_needs_treated_value(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    frame = small_rows().with_columns(
        variant=pl.when(pl.col("treated") == 1).then(pl.lit("B")).otherwise(pl.lit("A"))).drop("treated")
    frame.write_parquet(path)
    out = tmp_path / "out"
    code, err = run_cli(["fit", path, "--outcome", "y", "--treatment", "variant", "--out", out], capsys)
    assert code == 2 and "pass --treated-value" in err and not out.exists()
    code, err = run_cli(["fit", path, "--outcome", "y", "--treatment", "variant", "--treated-value", "C",
                         "--out", out], capsys)
    assert code == 2 and "'C' is not a value" in err and not out.exists()


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text("")
    assert_refused(tmp_path, capsys, path, match="is empty")
    header_only = tmp_path / "header.csv"
    header_only.write_text("group,treated,y\n")
    assert_refused(tmp_path, capsys, header_only, match="has no rows")


def test_unreadable_file(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    assert_refused(tmp_path, capsys, path, match="cannot read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path, capsys, rows_file):
    rows_file.chmod(0)
    assert_refused(tmp_path, capsys, rows_file, match="cannot be read")


def test_glob_matches_nothing(tmp_path, capsys):
    assert_refused(tmp_path, capsys, str(tmp_path / "nothing-*.parquet"), match="matches no files")


@pytest.mark.parametrize("interval", ["0", "1", "1.5", "-0.2"])
def test_interval_outside_unit(tmp_path, capsys, rows_file, interval):
    assert_refused(tmp_path, capsys, rows_file, "--interval", interval, match="outside (0, 1)")


@pytest.mark.parametrize("prior,match", [
    ("effect_sigma=halfnormal(1)", "unknown prior name 'effect_sigma'"),
    ("effect_scale=halfnormal(1", "cannot read distribution"),
    ("effect_scale=gamma(1,2)", "unknown distribution 'gamma'"),
    ("effect_scale=normal(0,1)", "needs positive support"),
    ("effect_mean=normal(0)", "takes 2 argument(s)"),
    ("effect_mean=normal(0,-1)", "must be > 0"),
    ("effect_scale.region=halfnormal(1)", "level 'region' is not a grouping level"),
    ("effect_mean", "expected NAME=DIST"),
    ("correlation=lkj(2)", "needs correlated effects; pass --correlated"),
    ("effect_mean=lkj(2)", "correlation takes only lkj(eta)"),
    ("noise.treated=halfnormal(1)", "needs per-arm noise; pass --noise-by-arm"),
])
def test_bad_prior(tmp_path, capsys, rows_file, prior, match):
    assert_refused(tmp_path, capsys, rows_file, "--prior", prior, match=match)


def test_group_in_two_parents(tmp_path, capsys):
    frame = small_rows(levels=("country", "region"), groups=20)
    # Claim one region for a second country.
    region = frame["region"][0]
    other = frame.filter(pl.col("region") != region)["country"][0]
    frame = pl.concat([frame, frame.filter(pl.col("region") == region).with_columns(country=pl.lit(other))])
    with pytest.raises(DataError, match=f"group '{region}' of level 'region' sits under 2"):
        engine.fit(frame, outcome="y", treatment="treated", groups=["country", "region"])


def test_float_group_key_refused(rows_file):
    frame = pl.read_parquet(rows_file).with_columns(g=pl.col("y"))
    with pytest.raises(SchemaError, match="group column 'g' has type Float64"):
        engine.fit(frame, outcome="y", treatment="treated", groups=["g"])


def test_bad_options_are_spec_errors():
    frame = small_rows()
    with pytest.raises(SpecError, match="draws"):
        engine.fit(frame, outcome="y", treatment="treated", draws=0)
    with pytest.raises(SpecError, match="more than one role"):
        engine.fit(frame, outcome="y", treatment="y")
    with pytest.raises(SpecError, match="does not apply to family 'poisson'"):
        engine.fit(frame, outcome="y", treatment="treated", family="poisson", method="exact")
    with pytest.raises(SpecError, match="needs --trials"):
        engine.fit(frame, outcome="y", treatment="treated", family="binomial")
    with pytest.raises(SpecError, match="--exposure applies to family poisson only"):
        engine.fit(frame, outcome="y", treatment="treated", exposure="group")
    with pytest.raises(SpecError, match="noise' does not apply to family 'bernoulli'"):
        engine.fit(frame, outcome="y", treatment="treated", family="bernoulli", priors={"noise": "halfnormal(1)"})


def test_binned_covariate_options_are_checked_before_any_compute(tmp_path, capsys):
    """GLMs with covariates take the binned route: its options are checked up front, and cell
    tables (whose bin edges would differ between sites) are refused."""
    rows, _ = engine.simulate(rows=200, groups=10, seed=0, family="bernoulli", covariate=True)
    with pytest.raises(SpecError, match="covariate_bins: expected an integer from 2 to 1000, found 1"):
        engine.fit(rows, outcome="y", treatment="treated", family="bernoulli", covariates=["pre"], covariate_bins=1)
    with pytest.raises(SpecError, match="'covariate_bin' is reserved"):
        engine.fit(rows.rename({"group": "covariate_bin"}), outcome="y", treatment="treated",
                   groups=["covariate_bin"], family="bernoulli", covariates=["pre"])
    path = tmp_path / "rows.parquet"
    rows.write_parquet(path)
    out = tmp_path / "cells.parquet"
    code, err = run_cli(["reduce", path, "--outcome", "y", "--treatment", "treated", "--group", "group",
                         "--family", "bernoulli", "--covariate", "pre", "--out", out], capsys)
    assert code == 2 and "keyed by covariate bins" in err and not out.exists(), err


def glm_rows(family, **changes):
    rows, _ = engine.simulate(rows=200, groups=10, seed=0, family=family)
    return rows.with_columns(**changes) if changes else rows


def glm_args(family):
    extra = {"binomial": ["--trials", "trials"], "poisson": ["--exposure", "exposure"]}.get(family, [])
    return ["--family", family, *extra]


@pytest.mark.parametrize("family,changes,match", [
    ("bernoulli", {"y": pl.when(pl.int_range(pl.len()) % 7 == 3).then(2).otherwise(pl.col("y"))},
     "outcome column 'y' must be 0/1 (or boolean) for family bernoulli; found 2 (29 row(s) outside {0, 1})"),
    ("binomial", {"y": pl.col("trials") + (pl.int_range(pl.len()) == 5)},
     "has more successes than trials ('trials') in 1 row(s)"),
    ("binomial", {"y": pl.when(pl.int_range(pl.len()) == 4).then(-1).otherwise(pl.col("y"))},
     "counts successes and must be a whole number ≥ 0; found -1 (1 row(s))"),
    ("poisson", {"y": pl.when(pl.int_range(pl.len()) == 9).then(-3).otherwise(pl.col("y"))},
     "must be a whole-number count ≥ 0 for family poisson; found -3 (1 row(s))"),
    ("poisson", {"y": pl.col("y") + 0.5},
     "must be a whole-number count ≥ 0 for family poisson; found 0.5"),
    ("poisson", {"exposure": pl.when(pl.int_range(pl.len()) < 3).then(0.0).otherwise(pl.col("exposure"))},
     "exposure column 'exposure' must be > 0; found 0.0 (3 row(s))"),
])
def test_glm_bad_values_refused(tmp_path, capsys, family, changes, match):
    path = tmp_path / "rows.parquet"
    glm_rows(family, **changes).write_parquet(path)
    assert_refused(tmp_path, capsys, path, *glm_args(family), match=match)
    # Invalid values are not missing ones: --drop-missing does not drop them.
    assert_refused(tmp_path, capsys, path, *glm_args(family), "--drop-missing", match=match)


def test_glm_missing_trials_column(tmp_path, capsys):
    path = tmp_path / "rows.parquet"
    glm_rows("binomial").drop("trials").write_parquet(path)
    assert_refused(tmp_path, capsys, path, "--family", "binomial", "--trials", "trials",
                   match="trials column 'trials' not found")


@pytest.mark.parametrize("stderr,match", [
    ([1.0, 0.0, 2.0], "not positive and finite (first: 0.0 for group 'b')"),
    ([1.0, -3.0, 2.0], "not positive and finite (first: -3.0"),
    ([1.0, None, 2.0], "not positive and finite"),
    ([1.0, float("nan"), 2.0], "not positive and finite"),
])
def test_summary_level_bad_stderr(tmp_path, capsys, stderr, match):
    path = tmp_path / "estimates.csv"
    pl.DataFrame({"site": ["a", "b", "c"], "est": [1.0, 2.0, 3.0], "se": stderr}).write_csv(path)
    out = tmp_path / "out"
    code, err = run_cli(["fit", path, "--estimate", "est", "--stderr", "se", "--group", "site", "--out", out], capsys)
    assert code == 2 and match in err, err
    assert not out.exists()


def test_summary_level_duplicate_group_and_mixed_inputs():
    table = pl.DataFrame({"site": ["a", "a", "c"], "est": [1.0, 2.0, 3.0], "se": [1.0, 1.0, 1.0]})
    with pytest.raises(DataError, match="group 'a' has 2 rows"):
        engine.fit(table, estimate="est", stderr="se", groups=["site"])
    with pytest.raises(SpecError, match="not both"):
        engine.fit(table, outcome="est", treatment="se", estimate="est", stderr="se", groups=["site"])
    with pytest.raises(SpecError, match="needs --group"):
        engine.fit(table, estimate="est", stderr="se")
    with pytest.raises(SpecError, match="does not apply to summary-level input"):
        engine.fit(table, estimate="est", stderr="se", groups=["site"], priors={"noise": "halfnormal(1)"})


def test_keep_draws_is_checked_before_any_compute(tmp_path, capsys):
    frame = small_rows()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SpecError, match="keep_draws"):
            engine.fit(frame, outcome="y", treatment="treated", keep_draws=bad)
    # Asking to retain more than half the machine's memory is refused before sampling.
    with pytest.raises(SpecError, match="more than half of this machine's"):
        engine.fit(frame, outcome="y", treatment="treated", groups=["group"], draws=10**9, chains=4,
                   keep_draws=10**9)
    frame.write_parquet(tmp_path / "rows.parquet")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", str(tmp_path / "rows.parquet"), "--outcome", "y", "--treatment", "treated",
              "--keep-draws", "some", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "expected a number of draws or 'all'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
