"""Simulation-based calibration of `exact` (Talts et al. 2018); `laplace`'s is in
test_sbc_laplace.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.cli import main
from engine.infer.calibrate import chi2_uniformity


def test_chi2_uniformity_detects_non_uniform_ranks():
    rng = np.random.default_rng(0)
    assert chi2_uniformity(rng.integers(0, 20, 400), 19, 5) > 0.01
    # Ranks piled at the ends: an over-confident posterior.
    assert chi2_uniformity(np.concatenate([np.zeros(200, int), np.full(200, 19)]), 19, 5) < 1e-6


@pytest.mark.slow
def test_exact_is_calibrated(tmp_path, capsys):
    assert main(["validate", "--method", "exact", "--groups", "30", "--rows", "150", "--replications", "40",
                 "--draws", "200", "--warmup", "300", "--chains", "2", "--seed", "11", "--out",
                 str(tmp_path / "sbc")]) == 0
    report = json.loads((tmp_path / "sbc" / "sbc.json").read_text())
    assert set(report["p_values"]) == {"baseline_mean", "effect_mean", "noise", "baseline_scale.level1",
                                       "effect_scale.level1", "ate"}
    assert report["ok"], report
    assert "calibrated" in capsys.readouterr().out


@pytest.mark.slow
def test_sbc_catches_a_wrong_prior(monkeypatch):
    """Power check: fitting with a prior other than the one that generated the data must fail SBC."""
    from engine.infer import calibrate
    from engine.priors import Prior

    fitted = dict(calibrate.SBC_PRIORS, effect_mean=Prior("normal", (1.5, 0.3)))
    real_run = calibrate.run_sbc

    original_priors = calibrate.SBC_PRIORS
    monkeypatch.setattr(calibrate, "FIT_PRIORS_OVERRIDE", fitted, raising=False)
    result = real_run(groups=30, rows=150, replications=20, draws=100, warmup=200, chains=2, seed=12)
    assert calibrate.SBC_PRIORS is original_priors
    assert result.p_values["effect_mean"] < 1e-3, result.p_values

