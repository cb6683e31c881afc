"""Simulation-based calibration of `laplace` (Bernoulli cells), run by `make test-long`.

Not in `make test`: NumPyro (0.22) re-jits its sampling loop on every replication (~10 s each
here, whatever the shapes), so 30 replications take 8 minutes or more on the 2-core CI
machine; and a long process of many compiles crashed XLA's CPU compiler twice and JAX's cache
write once. The replications pad their quadrature tables to one size, so only that re-jit is
left. Run by hand on 2026-11-26: 40 replications of 30 groups and 600 rows, p ≥ 0.29 for every
parameter (`causal-engine validate --method laplace --groups 30 --rows 600 --replications 40
--draws 200 --warmup 300 --chains 2 --seed 11`); 30 replications also passed as this test.
"""
from __future__ import annotations

import json
import os

import pytest

from engine.cli import main

pytestmark = pytest.mark.skipif(os.environ.get("CAUSAL_ENGINE_LONG_TESTS") != "1",
                                reason="long: run with `make test-long` (CAUSAL_ENGINE_LONG_TESTS=1)")


@pytest.mark.slow
def test_laplace_is_calibrated(tmp_path):
    assert main(["validate", "--method", "laplace", "--groups", "30", "--rows", "600", "--replications", "30",
                 "--draws", "200", "--warmup", "300", "--chains", "2", "--seed", "11", "--out",
                 str(tmp_path / "sbc")]) == 0
    report = json.loads((tmp_path / "sbc" / "sbc.json").read_text())
    assert set(report["p_values"]) == {"baseline_mean", "effect_mean", "baseline_scale.level1",
                                       "effect_scale.level1", "ate"}
    assert report["ok"], report
