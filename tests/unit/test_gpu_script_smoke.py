"""benchmarks/gpu/run.py, the one prepared GPU run, rehearsed on CPU at tiny sizes.

A session lent a GPU gets one try; these make sure the sections run to the end here first.
To keep `make test` short the rehearsal here fits `exact` only and leaves out the NUTS
section (about a minute more of compiling); before a GPU session run the whole rehearsal:
`python benchmarks/gpu/run.py --allow-cpu --smoke`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"
SECTIONS = ("device", "correctness", "bandwidth", "reduce", "tree", "fits")


def _env(out: Path) -> dict:
    # As a plain run would see it: not the test-wide float64 and fake host devices of conftest.py.
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    env.update(OUT=str(out), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env


def test_no_gpu_stops_clearly_without_allow_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections", "device,tree"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "STOP: no GPU found" in proc.stdout and "--allow-cpu" in proc.stdout
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["meta"]["stopped"] == "no GPU"
    assert report["sections"]["device"]["gpu"] is False
    assert "tree" not in report["sections"]


@pytest.mark.slow
def test_smoke_run_reports_every_section_ok(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--smoke", "--sections", ",".join(SECTIONS),
                           "--fit-methods", "exact"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    for section in SECTIONS:
        record = report["sections"][section]
        assert record["status"] == "ok", (section, record.get("error"), record.get("output_tail"))
        assert all(item.get("status") == "ok" for item in record.get("items", [])), section
    correctness = report["sections"]["correctness"]
    # As kernels/segments.py says: float64 and float32 after a float64 shift meet the stated
    # tolerance at mean 1e9, sd 1; raw float32 rows cannot.
    assert correctness["segments_verdict"] == {"float64": True, "float32-shifted": True, "float32-raw": False}
    assert correctness["tree_verdict"] is True
    fits = report["sections"]["fits"]["items"]
    assert [item["method"] for item in fits] == ["exact"]
    assert all(0 <= item["coverage"] <= 1 and item["rmse"] > 0 for item in fits)
    assert "polars" in report["sections"]["fits"]["imported"]       # engine needs it: a wheel to carry
    assert "polars" not in report["sections"]["tree"]["imported"]   # kernels alone: jax and numpy
    assert "SUMMARY" in proc.stdout and (tmp_path / "gpu.log").read_text().count("[fits]") >= 1
