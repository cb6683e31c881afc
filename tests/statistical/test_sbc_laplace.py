"""Simulation-based calibration of `laplace` (Bernoulli cells).

30 replications of 30 groups and 600 rows; every parameter's rank histogram must pass its χ²
test (Talts et al. 2018). The replications pad their quadrature tables to one size and the
hyperparameter NUTS is one cached program (`runner.run_hyper_nuts`), so only the first
replication compiles: 1 min 48 s on the 2-core development machine (it was kept out of
`make test` while NumPyro recompiled for every replication, ~8 minutes).
"""
from __future__ import annotations

import json

import pytest

from engine.cli import main


@pytest.mark.slow
def test_laplace_is_calibrated(tmp_path):
    assert main(["validate", "--method", "laplace", "--groups", "30", "--rows", "600", "--replications", "30",
                 "--draws", "200", "--warmup", "300", "--chains", "2", "--seed", "11", "--out",
                 str(tmp_path / "sbc")]) == 0
    report = json.loads((tmp_path / "sbc" / "sbc.json").read_text())
    assert set(report["p_values"]) == {"baseline_mean", "effect_mean", "baseline_scale.level1",
                                       "effect_scale.level1", "ate"}
    assert report["ok"], report
