"""The contract's files and columns, through the CLI and through the API."""
from __future__ import annotations

import json

import polars as pl
import pytest

import engine
from engine.cli import main
from tests.helpers import FAST

# Few draws keep these tests fast; their diagnostics are expected to warn.
pytestmark = pytest.mark.filterwarnings("ignore::engine.errors.ConvergenceWarning")

EFFECT_SCHEMA = {
    "level": pl.String, "group": pl.String, "parent": pl.String, "n": pl.Int64, "n_treated": pl.Int64,
    "mean": pl.Float64, "sd": pl.Float64, "lower": pl.Float64, "upper": pl.Float64,
    "prob_positive": pl.Float64, "link_mean": pl.Float64, "link_sd": pl.Float64,
    "link_lower": pl.Float64, "link_upper": pl.Float64,
}
INTERVAL_KEYS = {"mean", "sd", "lower", "upper"}


def check_outputs(folder, levels, n_rows):
    effects = pl.read_parquet(folder / "effects.parquet")
    assert dict(effects.schema) == EFFECT_SCHEMA
    summary = json.loads((folder / "summary.json").read_text())
    for key in ("family", "method", "interval", "n_rows", "levels", "n_groups", "ate", "new_group",
                "hyper", "diagnostics", "timings"):
        assert key in summary, key
    assert summary["n_rows"] == n_rows
    assert summary["levels"] == levels
    assert set(summary["ate"]) == INTERVAL_KEYS and set(summary["new_group"]) == INTERVAL_KEYS
    assert set(summary["diagnostics"]) >= {"ok", "max_rhat", "min_ess_bulk", "divergences", "messages"}
    # The contract's three keys, plus (an extension) where the fit's time went.
    assert {"reduce_s", "fit_s", "total_s"} <= set(summary["timings"])
    assert set(summary["timings"]) <= {"reduce_s", "fit_s", "total_s", "sample_s", "optimise_s", "downward_s"}
    for level in levels:
        rows = effects.filter(pl.col("level") == level)
        assert rows.height == summary["n_groups"][level]
        assert rows["n"].sum() == n_rows
    assert (effects["lower"] <= effects["mean"]).all() and (effects["mean"] <= effects["upper"]).all()
    assert effects["prob_positive"].is_between(0, 1).all()
    top = effects.filter(pl.col("level") == levels[0])
    assert top["parent"].null_count() == top.height
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["inputs"]["rows_used"] == n_rows
    assert len(provenance["inputs"]["cells_sha256"]) == 64
    return effects, summary, provenance


def test_cli_round_trip(tmp_path, capsys):
    sim_dir, fit_dir = tmp_path / "sim", tmp_path / "fit"
    assert main(["simulate", "--rows", "1500", "--groups", "40", "--levels", "country,region",
                 "--covariate", "--seed", "3", "--out", str(sim_dir)]) == 0
    args = ["fit", str(sim_dir / "rows.parquet"), "--outcome", "y", "--treatment", "treated",
            "--group", "country", "--group", "region", "--covariate", "pre", "--interval", "0.8",
            "--prior", "effect_scale=halfnormal(0.5)", "--draws", "150", "--warmup", "150", "--chains", "2",
            "--out", str(fit_dir)]
    assert main(args) == 0
    assert "ATE" in capsys.readouterr().out
    effects, summary, provenance = check_outputs(fit_dir, ["country", "region"], 1500)
    assert summary["interval"] == 0.8 and summary["method"] == "exact"
    assert provenance["spec"]["priors"]["effect_scale.region"] == "halfnormal(0.5)"
    assert provenance["inputs"]["files"][0]["path"].endswith("rows.parquet")
    assert main(["explain", str(fit_dir)]) == 0
    trail = capsys.readouterr().out
    assert "effect_scale.region ~ halfnormal(0.5)  [user]" in trail and "cells, sha256" in trail

    # reduce → fit --cells gives the same cells (same hash) and the same answer for the same seed.
    cells_path = tmp_path / "cells.parquet"
    assert main(["reduce", str(sim_dir / "rows.parquet"), "--outcome", "y", "--treatment", "treated",
                 "--group", "country", "--group", "region", "--covariate", "pre", "--out", str(cells_path)]) == 0
    from_cells = tmp_path / "fit-cells"
    cell_args = ["fit", "--cells", str(cells_path), *args[args.index("--group"):-1], str(from_cells)]
    assert main(cell_args) == 0
    _, summary2, provenance2 = check_outputs(from_cells, ["country", "region"], 1500)
    assert provenance2["inputs"]["cells_sha256"] == provenance["inputs"]["cells_sha256"]
    assert summary2["ate"] == pytest.approx(summary["ate"], rel=1e-9)


def test_api_round_trip_and_seed_reproducibility(tmp_path):
    sim = engine.simulate(rows=800, groups=30, seed=4)
    first = engine.fit(sim.rows, outcome="y", treatment="treated", groups=["group"], seed=11, **FAST)
    second = engine.fit(sim.rows.to_pandas(), outcome="y", treatment="treated", groups="group", seed=11, **FAST)
    assert first.ate() == second.ate()
    assert first.effects("group").equals(second.effects("group"))
    first.save(tmp_path / "out")
    check_outputs(tmp_path / "out", ["group"], 800)
    assert first.provenance["inputs"]["cells_sha256"] == second.provenance["inputs"]["cells_sha256"]
    with pytest.raises(engine.SpecError, match="not a grouping level"):
        first.effects("region")


def test_no_groups_is_a_plain_ate(tmp_path):
    sim = engine.simulate(rows=600, groups=10, seed=5)
    result = engine.fit(sim.rows.to_arrow(), outcome="y", treatment="treated", **FAST)
    assert result.summary["levels"] == [] and result.effects().height == 0
    y = sim.rows
    raw = y.filter(pl.col("treated") == 1)["y"].mean() - y.filter(pl.col("treated") == 0)["y"].mean()
    ate = result.ate()
    # With no groups the posterior mean is the difference in means, up to prior and MC error.
    assert abs(ate["mean"] - raw) < 0.1 * ate["sd"] + 4 * ate["sd"] / (FAST["draws"] * FAST["chains"]) ** 0.5
    result.save(tmp_path / "out")
    assert pl.read_parquet(tmp_path / "out" / "effects.parquet").height == 0


def test_string_treatment_with_treated_value_and_csv_glob(tmp_path):
    sim = engine.simulate(rows=600, groups=12, seed=6)
    frame = sim.rows.with_columns(
        variant=pl.when(pl.col("treated") == 1).then(pl.lit("B")).otherwise(pl.lit("A"))).drop("treated")
    frame[:300].write_csv(tmp_path / "part-1.csv")
    frame[300:].write_csv(tmp_path / "part-2.csv")
    result = engine.fit(str(tmp_path / "part-*.csv"), outcome="y", treatment="variant", treated_value="B",
                        groups=["group"], **FAST)
    assert result.provenance["spec"]["treatment_values"] == {"treated": "'B'", "control": "'A'"}
    assert len(result.provenance["inputs"]["files"]) == 2
    assert result.summary["n_rows"] == 600


def test_one_arm_group_is_valid(tmp_path):
    sim = engine.simulate(rows=600, groups=12, seed=8)
    only_control = sim.rows.filter(~((pl.col("group") == sim.rows["group"][0]) & (pl.col("treated") == 1)))
    result = engine.fit(only_control, outcome="y", treatment="treated", groups=["group"], **FAST)
    row = result.effects("group").filter(pl.col("group") == sim.rows["group"][0])
    assert row["n_treated"].item() == 0
    # No treated rows: its effect is informed by pooling alone, so its interval is wide but finite.
    assert row["sd"].item() > 0 and row["upper"].item() < float("inf")


def test_saved_draws_are_aligned_with_the_summaries(tmp_path):
    import numpy as np

    sim = engine.simulate(rows=900, groups=25, levels=["country", "region"], seed=9)
    result = engine.fit(sim.rows, outcome="y", treatment="treated", groups=["country", "region"], **FAST)
    result.save(tmp_path / "out")
    saved = np.load(tmp_path / "out" / "draws.npz")
    regions = result.effects("region")
    draws = saved["effect.region"]
    assert draws.shape == (FAST["draws"] * FAST["chains"], regions.height)
    assert saved["ate"].shape == saved["new_group"].shape == (draws.shape[0],)
    # The summaries' mean is Rao-Blackwellised; the raw draws agree within their MC error.
    se = regions["sd"].to_numpy() / np.sqrt(draws.shape[0])
    assert (np.abs(draws.mean(0) - regions["mean"].to_numpy()) < 5 * se + 1e-6).all()
    # The ATE is the row-weighted mean of the leaf effects, draw by draw.
    weights = regions["n"].to_numpy() / regions["n"].sum()
    np.testing.assert_allclose(saved["ate"], draws @ weights, rtol=1e-4, atol=1e-4)
    kept, keys = result.group_draws("region")
    assert kept.shape == draws.shape and keys.to_list() == regions["group"].to_list()


def test_summary_level_input_with_padded_groups():
    """10 groups pad to 16 leaves; padding leaves carry no information (regression: log 0)."""
    import numpy as np

    rng = np.random.default_rng(3)
    estimates = rng.normal(1.0, 2.0, 10)
    table = pl.DataFrame({"study": [f"s{i}" for i in range(10)], "est": estimates, "se": 0.01})
    result = engine.fit(table, estimate="est", stderr="se", groups=["study"], **FAST)
    effects = result.effects("study").sort("group")
    # Standard errors of 0.01 against a spread of 2: each posterior sits on its estimate.
    assert np.allclose(effects["mean"].to_numpy(), estimates[np.argsort([f"s{i}" for i in range(10)])],
                       atol=5 * 0.01)
    assert effects.height == 10


def test_keep_draws_thins_the_saved_draws_only(tmp_path, capsys):
    """``keep_draws`` bounds the retained joint draws (evenly thinned); the summaries still
    use every draw, the saved rows stay joint (ATE = their weighted mean), and the CLI's
    ``all`` keeps every draw."""
    import numpy as np

    sim = engine.simulate(rows=600, groups=30, seed=4)
    kwargs = dict(outcome="y", treatment="treated", groups=["group"], seed=2, **FAST)
    thinned = engine.fit(sim.rows, keep_draws=30, **kwargs)
    full = engine.fit(sim.rows, **kwargs)
    assert thinned.provenance["spec"]["keep_draws"] == 30
    thinned.save(tmp_path / "thin")
    saved = np.load(tmp_path / "thin" / "draws.npz")
    total = FAST["draws"] * FAST["chains"]
    stride = -(-total // 30)
    assert saved["effect.group"].shape == (len(range(0, total, stride)), 30)
    weights = thinned.effects("group")["n"].to_numpy() / thinned.effects("group")["n"].sum()
    np.testing.assert_allclose(saved["ate"], saved["effect.group"] @ weights, rtol=1e-4, atol=1e-4)
    # Same seed, same hyperparameter draws: every draw still feeds the means and sds.
    for column in ("mean", "sd", "prob_positive"):
        np.testing.assert_allclose(thinned.effects("group")[column].to_numpy(),
                                   full.effects("group")[column].to_numpy(), rtol=1e-9, atol=1e-12)

    sim.rows.write_parquet(tmp_path / "rows.parquet")
    assert main(["fit", str(tmp_path / "rows.parquet"), "--outcome", "y", "--treatment", "treated", "--group", "group",
                 "--draws", "50", "--warmup", "50", "--chains", "2", "--keep-draws", "all",
                 "--out", str(tmp_path / "all")]) == 0
    assert np.load(tmp_path / "all" / "draws.npz")["effect.group"].shape == (100, 30)
