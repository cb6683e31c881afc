"""transport, decide, refute and explain through the CLI: files, columns, provenance, bad input.

One small fit (module fixture) serves every test; the decision and transport
arithmetic is also checked on synthetic posterior draws with a known answer.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import polars as pl
import pytest

import engine
from engine.cli import main
from engine.decide import DECISION_COLUMNS, evaluate
from engine.refute import permute_within
from engine.transport import TARGET_GROUP_COLUMNS, FitView, transport

pytestmark = pytest.mark.filterwarnings("ignore::engine.errors.ConvergenceWarning")

SAMPLER = ["--draws", "300", "--warmup", "300", "--chains", "2"]
TRANSPORT_KEYS = {"ate", "unseen_share", "shift", "verdict", "messages"}
INTERVAL_KEYS = {"mean", "sd", "lower", "upper"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    sim = engine.simulate(rows=2_400, groups=24, seed=21, covariate=True, effect_scale=0.8)
    rows_path = root / "rows.parquet"
    sim.rows.write_parquet(rows_path)
    fit_dir = root / "fit"
    assert main(["fit", str(rows_path), "--outcome", "y", "--treatment", "treated", "--group", "group",
                 "--covariate", "pre", "--design-share", "0.5", *SAMPLER, "--out", str(fit_dir)]) == 0
    return {"root": root, "rows": sim.rows, "fit": fit_dir, "sim": sim}


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, args, out, match):
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert match in err, err
    assert err.count("\n") == 1, "one clear message on stderr"
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "no temporary leftovers"


def target_rows(rows: pl.DataFrame, groups: int = 6, new_rows: int = 30, shift: float = 0.0) -> pl.DataFrame:
    keep = rows["group"].unique().sort().head(groups)
    target = rows.filter(pl.col("group").is_in(keep.implode())).select("group", pl.col("pre") + shift)
    new = pl.DataFrame({"group": ["group-new"] * new_rows, "pre": np.linspace(-1, 1, new_rows)})
    return pl.concat([target, new])


# ---------------------------------------------------------------- the fit's new outputs


def test_fit_summary_has_checks_and_the_covariate_profile(fitted, capsys):
    summary = json.loads((fitted["fit"] / "summary.json").read_text())
    record = json.loads((fitted["fit"] / "provenance.json").read_text())
    checks = summary["checks"]
    assert set(checks) == {"ok", "sample_ratio", "balance", "placebo", "messages"}
    srm = checks["sample_ratio"]
    treated = int(fitted["rows"]["treated"].sum())
    assert (srm["n"], srm["n_treated"], srm["design_share"]) == (2_400, treated, 0.5)
    assert set(checks["balance"]["covariates"]) == {"pre"}
    pre = fitted["rows"]["pre"].to_numpy()
    profile = summary["covariates"]["pre"]
    assert (profile["min"], profile["max"]) == (pre.min(), pre.max())
    assert profile["mean"] == pytest.approx(pre.mean(), rel=1e-9)
    assert record["kind"] == "fit" and record["checks"] == checks
    assert record["spec"]["design_share"] == 0.5 and record["spec"]["priors_user"] == {}
    code, out, _ = run_cli(["explain", fitted["fit"]], capsys)
    assert code == 0 and "Trust checks" in out and "sample ratio:" in out and "causal-engine refute" in out


# ---------------------------------------------------------------- transport


def test_transport_rows_round_trip(fitted, tmp_path, capsys):
    path = tmp_path / "target.parquet"
    target = target_rows(fitted["rows"])
    target.write_parquet(path)
    out = tmp_path / "moved"
    code, printed, err = run_cli(["transport", fitted["fit"], "--target", path, "--out", out], capsys)
    assert code == 0, err
    assert "target ATE" in printed and "verdict" in printed
    report = json.loads((out / "transport.json").read_text())
    assert TRANSPORT_KEYS <= set(report) and set(report["ate"]) == INTERVAL_KEYS
    assert report["ate"]["lower"] <= report["ate"]["mean"] <= report["ate"]["upper"]
    assert report["unseen_share"] == pytest.approx(30 / target.height)
    assert set(report["shift"]) == {"pre"} and set(report["shift"]["pre"]) >= {"smd", "outside_share"}
    assert report["verdict"] == "ok", report["messages"]
    assert any("shared slopes" in m for m in report["messages"])

    groups = pl.read_parquet(out / "target_groups.parquet")
    assert dict(groups.schema) == TARGET_GROUP_COLUMNS
    assert groups.height == 7 and groups.filter(~pl.col("seen"))["group"].to_list() == ["group-new"]
    assert groups.filter(~pl.col("seen"))["basis"].item() == "new_group"
    saved = np.load(out / "draws.npz")
    weights = groups["n"].to_numpy() / groups["n"].sum()
    np.testing.assert_allclose(saved["ate"], saved["effect.group"].astype(np.float64) @ weights, rtol=1e-5, atol=1e-5)

    record = json.loads((out / "provenance.json").read_text())
    fit_record = json.loads((fitted["fit"] / "provenance.json").read_text())
    assert record["kind"] == "transport" and record["format"] == fit_record["format"]
    assert record["source"]["cells_sha256"] == fit_record["inputs"]["cells_sha256"]
    assert record["source"]["path"] == str(fitted["fit"].resolve())
    assert record["target"]["files"][0]["path"] == str(path) and record["target"]["mode"] == "rows"
    assert record["options"]["max_smd"] == 0.25 and record["shift"] == report["shift"]

    code, trail, _ = run_cli(["explain", out], capsys)
    assert code == 0 and "Target population" in trail and "verdict OK" in trail
    assert fit_record["inputs"]["cells_sha256"] in trail


def test_transport_counts_thresholds_and_the_unchecked_covariate(fitted, tmp_path, capsys):
    counts = pl.DataFrame({"group": ["group-00", "group-01", "group-new"], "users": [500, 300, 200]})
    path = tmp_path / "counts.csv"
    counts.write_csv(path)
    out = tmp_path / "moved"
    code, _, err = run_cli(["transport", fitted["fit"], "--target", path, "--count", "users",
                            "--max-unseen", "0.1", "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / "transport.json").read_text())
    assert report["unseen_share"] == pytest.approx(0.2)
    assert report["verdict"] == "warn" and report["shift"] == {}
    assert any("never saw" in m for m in report["messages"])
    assert any("group counts" in m and "'pre'" in m for m in report["messages"])
    assert json.loads((out / "provenance.json").read_text())["target"]["count_column"] == "users"


def test_transport_flags_a_shifted_covariate(fitted, tmp_path, capsys):
    path = tmp_path / "shifted.parquet"
    target_rows(fitted["rows"], shift=10.0).write_parquet(path)
    out = tmp_path / "moved"
    code, printed, _ = run_cli(["transport", fitted["fit"], "--target", path, "--out", out], capsys)
    assert code == 0
    report = json.loads((out / "transport.json").read_text())
    shift = report["shift"]["pre"]
    assert report["verdict"] == "warn" and shift["smd"] > 2 and shift["outside_share"] > 0.5
    assert "covariate 'pre' is shifted in the target" in printed


# ---------------------------------------------------------------- decide


def test_decide_round_trip_on_a_fit_and_on_a_transport(fitted, tmp_path, capsys):
    out = tmp_path / "decision"
    code, printed, err = run_cli(["decide", fitted["fit"], "--benefit", "2", "--cost", "1", "--out", out], capsys)
    assert code == 0, err
    assert "whole population" in printed
    table = pl.read_parquet(out / "decisions.parquet")
    assert dict(table.schema) == DECISION_COLUMNS
    assert table.height == 24 and set(table["action"]) <= {"treat", "control"}
    # The mean-optimal action need not be the more probable one under a skewed posterior,
    # so prob_best is only bounded, and EVPI = E[max U] − max E[U] ≥ 0 by Jensen.
    assert table["prob_best"].is_between(0, 1).all() and (table["evpi"] >= 0).all()
    decisive = table.filter(pl.col("expected_loss") < 1e-3)
    assert (decisive["prob_best"] > 0.5).all()
    summary = json.loads((out / "decisions.json").read_text())
    effects = pl.read_parquet(fitted["fit"] / "effects.parquet")
    n = table.join(effects.select("group", "n"), on="group")["n"].to_numpy()
    assert summary["totals"]["evpi"] == pytest.approx(float((n * table["evpi"].to_numpy()).sum()))
    assert summary["totals"]["expected_utility"] == pytest.approx(float((n * table["expected_utility"]).sum()))
    assert summary["value_of_information"][0]["evpi_total"] == pytest.approx(float((n * table["evpi"]).max()))
    record = json.loads((out / "provenance.json").read_text())
    assert record["kind"] == "decision" and record["options"] == {"benefit": 2.0, "cost": 1.0, "level": "group"}
    code, trail, _ = run_cli(["explain", out], capsys)
    assert code == 0 and "per row: treat = 2.0 × effect − 1.0" in trail

    path = tmp_path / "target.parquet"
    target_rows(fitted["rows"]).write_parquet(path)
    moved = tmp_path / "moved"
    assert run_cli(["transport", fitted["fit"], "--target", path, "--out", moved], capsys)[0] == 0
    out2 = tmp_path / "decision2"
    assert run_cli(["decide", moved, "--benefit", "2", "--cost", "1", "--out", out2], capsys)[0] == 0
    assert pl.read_parquet(out2 / "decisions.parquet").height == 7
    record = json.loads((out2 / "provenance.json").read_text())
    assert record["source"]["kind"] == "transport" and record["source"]["fit_path"] == str(fitted["fit"].resolve())


# ---------------------------------------------------------------- bad input


def broken_fit(fitted, tmp_path, edit_fn):
    copy = tmp_path / "fit-copy"
    shutil.copytree(fitted["fit"], copy)
    path = copy / "provenance.json"
    record = json.loads(path.read_text())
    edit_fn(record)
    path.write_text(json.dumps(record))
    return copy


def test_transport_bad_input(fitted, tmp_path, capsys):
    out = tmp_path / "out"
    fit = fitted["fit"]
    no_group = tmp_path / "no-group.parquet"
    target_rows(fitted["rows"]).rename({"group": "market"}).write_parquet(no_group)
    assert_refused(capsys, ["transport", fit, "--target", no_group, "--out", out],
                   out, "target is missing grouping column 'group', which the fit used")
    no_cov = tmp_path / "no-cov.parquet"
    target_rows(fitted["rows"]).drop("pre").write_parquet(no_cov)
    assert_refused(capsys, ["transport", fit, "--target", no_cov, "--out", out],
                   out, "target is missing covariate column 'pre'")
    negative = tmp_path / "negative.csv"
    pl.DataFrame({"group": ["group-00", "group-01"], "users": [10, -3]}).write_csv(negative)
    assert_refused(capsys, ["transport", fit, "--target", negative, "--count", "users", "--out", out],
                   out, "target count column 'users' has 1 negative value(s) (first for 'group' = 'group-01')")
    good = tmp_path / "good.parquet"
    target_rows(fitted["rows"]).write_parquet(good)
    assert_refused(capsys, ["transport", fit, "--target", good, "--count", "nope", "--out", out],
                   out, "target count column 'nope' (--count) not found")
    assert_refused(capsys, ["transport", fit, "--target", good, "--max-smd", "nan", "--out", out],
                   out, "max_smd: expected a finite number, found 'nan'")
    assert_refused(capsys, ["transport", fit, "--target", good, "--max-outside", "1.5", "--out", out],
                   out, "max_outside: expected a number in [0, 1]")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(capsys, ["transport", empty, "--target", good, "--out", out],
                   out, "holds no provenance.json, so it is not a causal-engine result")
    old = broken_fit(fitted, tmp_path, lambda r: r.update(format="causal-engine/provenance/0"))
    assert_refused(capsys, ["transport", old, "--target", good, "--out", out],
                   out, "was written by an incompatible version of causal-engine (provenance format "
                        "'causal-engine/provenance/0'")
    assert_refused(capsys, ["transport", fit, "--target", good, "--out", fit], fit / "nested-never",
                   "is the transport input folder itself")
    assert (fit / "summary.json").is_file()


def test_decide_bad_input(fitted, tmp_path, capsys):
    out = tmp_path / "out"
    fit = fitted["fit"]
    for flag, value in (("--benefit", "nan"), ("--benefit", "inf"), ("--cost", "-inf"), ("--cost", "ten")):
        args = {"--benefit": "1", "--cost": "1", flag: value}
        name = flag.lstrip("-")
        # `--cost=-inf`: a value starting with '-' must be attached to its option.
        assert_refused(capsys, ["decide", fit, f"--benefit={args['--benefit']}", f"--cost={args['--cost']}",
                                "--out", out], out, f"{name}: expected a finite number, found {value!r}")
    assert_refused(capsys, ["decide", fit, "--benefit", "1", "--cost", "1", "--level", "region", "--out", out],
                   out, "level 'region' is not a grouping level; the fit's levels are ['group']")
    decision = tmp_path / "decision"
    assert run_cli(["decide", fit, "--benefit", "1", "--cost", "1", "--out", decision], capsys)[0] == 0
    assert_refused(capsys, ["decide", decision, "--benefit", "1", "--cost", "1", "--out", out],
                   out, "holds a decision result (written by `causal-engine decide`)")
    no_draws = tmp_path / "no-draws"
    shutil.copytree(fit, no_draws)
    (no_draws / "draws.npz").unlink()
    assert_refused(capsys, ["decide", no_draws, "--benefit", "1", "--cost", "1", "--out", out],
                   out, "lacks draws.npz")


def test_refute_needs_rows(fitted, tmp_path, capsys):
    in_memory = broken_fit(fitted, tmp_path, lambda r: r["inputs"].update(kind="polars", files=[]))
    code, _, err = run_cli(["refute", in_memory], capsys)
    assert code == 2 and "in-memory data (polars)" in err and "engine.refute(result, data)" in err
    assert not (in_memory / "refute.json").exists()
    shutil.rmtree(in_memory)
    from_cells = broken_fit(fitted, tmp_path, lambda r: r["inputs"].update(kind="cells"))
    code, _, err = run_cli(["refute", from_cells], capsys)
    assert code == 2 and "cell tables" in err
    code, _, err = run_cli(["refute", fitted["fit"], "--draws", "0"], capsys)
    assert code == 2 and "draws: expected an integer ≥ 1, found 0" in err


# ---------------------------------------------------------------- the arithmetic, with known answers


def normal_evpi(m, s):
    """E[max(U, 0)] − max(E U, 0) for U ~ N(m, s²)."""
    z = m / s
    phi, cdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(-z / math.sqrt(2))
    return m * cdf + s * phi - max(m, 0.0)


def test_evaluate_matches_the_normal_closed_form():
    rng = np.random.default_rng(1)
    draws = 200_000
    means, sd, benefit, cost = np.array([-3.0, -0.4, 0.0, 0.3, 2.5]), 0.5, 4.0, 1.0
    effects = means + sd * rng.standard_normal((draws, means.size))
    out = evaluate(effects, benefit, cost)
    m, s = benefit * means - cost, benefit * sd
    # Monte Carlo sd of a mean of max(U, 0) is at most s/√draws; 5 of them is a 1-in-10⁶ miss.
    tolerance = 5 * s / math.sqrt(draws)
    for j in range(means.size):
        assert out["evpi"][j] == pytest.approx(normal_evpi(m[j], s), abs=tolerance)
        assert out["action"][j] == ("treat" if m[j] > 0 else "control")
        p_treat = 0.5 * math.erfc(-m[j] / s / math.sqrt(2))
        assert out["prob_best"][j] == pytest.approx(p_treat if m[j] > 0 else 1 - p_treat,
                                                    abs=5 * 0.5 / math.sqrt(draws))
    assert out["expected_utility"][0] == 0.0 and out["expected_utility"][4] == pytest.approx(m[4], abs=tolerance)
    np.testing.assert_array_equal(out["expected_loss"], out["evpi"])
    assert np.argmax(out["evpi"]) == int(np.argmin(np.abs(m)))


def synthetic_fit(draws: int = 40_000, seed: int = 0) -> FitView:
    """Two levels (region ▸ market) with known independent normal draws and a new-group draw."""
    rng = np.random.default_rng(seed)
    regions = pl.DataFrame({"level": "region", "group": ["r1", "r2"], "parent": [None, None], "n": [60, 40]},
                           schema_overrides={"parent": pl.String})
    markets = pl.DataFrame({"level": "market", "group": ["m1", "m2", "m3"], "parent": ["r1", "r1", "r2"],
                            "n": [30, 30, 40]})
    region_draws = np.array([1.0, -1.0]) + 0.1 * rng.standard_normal((draws, 2))
    market_draws = np.array([1.5, 0.5, -1.0]) + 0.1 * rng.standard_normal((draws, 3))
    new_group = 0.2 + 0.8 * rng.standard_normal(draws)
    summary = {"levels": ["region", "market"], "interval": 0.9, "n_rows": 100,
               "ate": {"mean": 0.3, "sd": 0.1, "lower": 0.1, "upper": 0.5},
               "hyper": {"effect_scale.region": {"mean": 0.8, "sd": 0.0},
                         "effect_scale.market": {"mean": 0.3, "sd": 0.4}}}
    return FitView(None, summary, {"spec": {"covariates": []}, "inputs": {}},
                   pl.concat([regions, markets], how="diagonal"),
                   {"ate": market_draws @ np.array([0.3, 0.3, 0.4]), "new_group": new_group,
                    "effect.region": region_draws.astype(np.float32),
                    "effect.market": market_draws.astype(np.float32)})


def test_post_stratification_arithmetic_on_known_draws():
    fit = synthetic_fit()
    target = pl.DataFrame({"region": ["r1", "r2", "r1", "r9"], "market": ["m1", "m3", "m-new", "m-far"],
                           "n": [50.0, 10.0, 25.0, 15.0]})
    moved = transport(fit, target, count="n", seed=3)
    groups = moved.groups.sort("group")
    assert groups["group"].to_list() == ["m-far", "m-new", "m1", "m3"]
    assert groups["basis"].to_list() == ["new_group", "ancestor:region", "group", "group"]
    draws = moved.draws["effect.market"].astype(np.float64)
    order = {g: j for j, g in enumerate(moved.groups["group"].to_list())}
    # Seen markets carry their own draws, unchanged.
    np.testing.assert_array_equal(draws[:, order["m1"]], fit.draws["effect.market"][:, 0])
    # A new market in a seen region: the region's draw plus N(0, E[σ_market²]) = N(0, 0.3² + 0.4²).
    spread = draws[:, order["m-new"]] - fit.draws["effect.region"][:, 0]
    k = spread.size
    assert spread.mean() == pytest.approx(0.0, abs=5 * 0.5 / math.sqrt(k))
    # sd of a sample variance of normals: σ²·√(2/(k−1)).
    assert spread.var() == pytest.approx(0.25, abs=5 * 0.25 * math.sqrt(2 / (k - 1)))
    # A market in an unseen region: the new-group draw plus the market-level spread.
    far = draws[:, order["m-far"]] - fit.draws["new_group"]
    assert far.var() == pytest.approx(0.25, abs=5 * 0.25 * math.sqrt(2 / (k - 1)))
    weights = np.array([50.0, 10.0, 25.0, 15.0]) / 100.0
    expected = draws[:, [order[g] for g in ("m1", "m3", "m-new", "m-far")]] @ weights
    np.testing.assert_allclose(moved.draws["ate"], expected, rtol=1e-5, atol=1e-6)
    assert moved.report["ate"]["mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert moved.report["unseen_share"] == pytest.approx(0.4)
    assert moved.report["composition"]["new_top_level_share"] == pytest.approx(0.15)
    assert moved.report["verdict"] == "warn"  # 40% unseen > 20%


def test_permutation_keeps_each_groups_treated_count():
    rows = engine.simulate(rows=2_000, groups=30, seed=2).rows
    permuted = permute_within(rows, "treated", "group", seed=5)
    counts = lambda f: f.group_by("group").agg(pl.col("treated").sum()).sort("group")  # noqa: E731
    assert counts(permuted).equals(counts(rows))
    assert (permuted["treated"] != rows["treated"]).mean() > 0.3
    assert permuted.drop("treated").equals(rows.drop("treated"))
