"""benchmarks/peers.py end to end at the smallest size, the engine only: every record has the
fields the report needs, with sane values, and the harness imports no peer package."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_harness():
    spec = importlib.util.spec_from_file_location("peers_harness", BENCHMARKS / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_only_run_writes_scored_records(tmp_path):
    peers = load_harness()
    already = {m for m in peers.PEER_MODULES if m in sys.modules}
    # One fit per family; each runs in its own process, so the compile dominates the time.
    peers.main(["--sizes", "50", "--tools", "engine-exact,engine-svi", "--draws", "100", "--warmup", "100",
                "--chains", "2", "--cap", "240", "--out", str(tmp_path), "--no-plot"])

    report = json.loads((tmp_path / "peers.json").read_text())
    assert {"machine", "date", "settings", "records"} <= report.keys()
    records = {(r["family"], r["tool"]): r for r in report["records"]}
    assert records.keys() == {("gaussian", "engine-exact"), ("binary", "engine-svi")}
    for (family, tool), r in records.items():
        assert r["status"] == "ok", r["status"]
        assert r["groups"] == 50 and r["rows"] == 250
        assert 0 < r["compile_s"] <= r["wall_s"] <= r["process_s"]
        assert r["peak_mib"] > 10
        assert math.isfinite(r["rmse"]) and 0 < r["rmse"] < 2
        assert 0 <= r["coverage"] <= 1 and r["scored"] == 1.0
        assert r["min_ess_bulk"] > 0 and r["ess_per_s"] > 0 and math.isfinite(r["max_rhat"])
        assert r["priors_as_peers"], (r["priors"], "the harness's priors for the peers differ from the engine's")
        if family == "binary":
            assert math.isfinite(r["rmse_outcome"]) and 0 <= r["coverage_outcome"] <= 1
    table = (tmp_path / "peers.md").read_text()
    assert "engine-exact" in table and "engine-svi" in table
    assert not (tmp_path / "peers.png").exists()
    assert {m for m in peers.PEER_MODULES if m in sys.modules} == already


def test_missing_tool_is_reported_not_raised(tmp_path):
    peers = load_harness()
    tool = peers.Tool("absent", ("gaussian",), ("no_such_module_for_peers",), "absent tool")
    record = peers.measure(tool, "gaussian", 10, tmp_path, {}, None)
    assert record["status"].startswith("not installed: no_such_module_for_peers")
