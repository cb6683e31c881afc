"""Binary outcomes at scale: `laplace` (and `svi`) side by side with full NUTS, in one run.

For each size: simulate a long-tail Bernoulli experiment with known truth (base rates
from about 1% to 30%: baseline log odds N(−2.5, 1²), effect log odds ratio N(0.3, 0.3²)),
write it to Parquet, then run each method as a whole `causal-engine fit` process (read,
reduce, compile, sample, summarise, write) and score its group effects against the truth:

- wall seconds of the process, and fit seconds from summary.json;
- 90% interval coverage of the leaf groups' log odds ratios and risk differences;
- RMSE of the posterior means (link and outcome scale);
- min bulk ESS and max R-hat of the hyperparameters (NUTS: of everything it samples).

Full NUTS (`--method nuts`, the joint model over the cells, every group's (α, τ) sampled)
is the reference; each method has a time cap (`--cap` seconds) and is marked "did not
finish" beyond it.

Usage:
    python benchmarks/glm.py --sizes 20000:1000000 --methods laplace,nuts --cap 3600
    python benchmarks/glm.py --sizes 1000000:5000000 --methods laplace,svi

Prints a table and writes benchmarks/results/glm.json. The machine is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def simulate(groups: int, rows: int, seed: int, folder: Path) -> tuple[str, pl.DataFrame]:
    import engine

    sim = engine.simulate(rows=rows, groups=groups, seed=seed, family="bernoulli", baseline_mean=-2.5,
                          baseline_scale=1.0, effect_mean=0.3, effect_scale=0.3)
    path = folder / f"bernoulli_{groups}_{rows}.parquet"
    sim.rows.write_parquet(path)
    return str(path), sim.truth


def run_method(path: str, method: str, out: Path, cap: float, draws: int, warmup: int, chains: int) -> dict:
    command = [sys.executable, "-m", "engine.cli", "fit", path, "--outcome", "y", "--treatment", "treated",
               "--group", "group", "--family", "bernoulli", "--method", method, "--draws", str(draws),
               "--warmup", str(warmup), "--chains", str(chains), "--out", str(out)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=cap,
                              env={**os.environ, "CAUSAL_ENGINE_PROGRESS": "0"})
    except subprocess.TimeoutExpired:
        return {"status": f"did not finish within {cap:.0f} s"}
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return {"status": "ok", "seconds": round(seconds, 2), **json.loads((out / "summary.json").read_text())}


def score(out: Path, truth: pl.DataFrame) -> dict:
    effects = pl.read_parquet(out / "effects.parquet").join(
        truth.select("group", "effect", "outcome_effect"), on="group")

    def covered(lo, hi, value):
        return float(((pl.col(lo) <= pl.col(value)) & (pl.col(value) <= pl.col(hi))).mean().alias("c")
                     .pipe(lambda e: effects.select(e).item()))

    def rmse(mean, value):
        return float(effects.select(((pl.col(mean) - pl.col(value)) ** 2).mean().sqrt()).item())

    return {"coverage_link": round(covered("link_lower", "link_upper", "effect"), 4),
            "coverage_outcome": round(covered("lower", "upper", "outcome_effect"), 4),
            "rmse_link": round(rmse("link_mean", "effect"), 5),
            "rmse_outcome": round(rmse("mean", "outcome_effect"), 6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20000:1000000", help="comma-separated GROUPS:ROWS")
    parser.add_argument("--methods", default="laplace,nuts")
    parser.add_argument("--cap", type=float, default=3600.0, help="seconds per method and size")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "glm.json"))
    args = parser.parse_args()

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes.split(","):
            groups, rows = (int(float(v)) for v in size.split(":"))
            path, truth = simulate(groups, rows, args.seed, folder)
            leaves = truth.filter(pl.col("level") == "group")
            true_ate = float(np.sum(leaves["outcome_effect"].to_numpy() * leaves["n"].to_numpy()) / rows)
            for method in args.methods.split(","):
                out = folder / f"fit_{method}_{groups}"
                result = run_method(path, method, out, args.cap, args.draws, args.warmup, args.chains)
                record = {"groups": groups, "rows": rows, "method": method, "status": result["status"],
                          "true_ate": round(true_ate, 6)}
                if result["status"] == "ok":
                    d = result["diagnostics"]
                    record.update(seconds=result["seconds"], fit_s=result["timings"]["fit_s"],
                                  ate=round(result["ate"]["mean"], 6), ate_sd=round(result["ate"]["sd"], 6),
                                  max_rhat=round(d["max_rhat"], 4), min_ess_bulk=round(d["min_ess_bulk"]),
                                  divergences=d["divergences"], **score(out, leaves))
                records.append(record)
                print(json.dumps(record), flush=True)
    by_size: dict = {}
    for r in records:
        by_size.setdefault((r["groups"], r["rows"]), {})[r["method"]] = r
    for (groups, rows), methods in by_size.items():
        base = methods.get("nuts", {}).get("seconds")
        for method, r in methods.items():
            if base and r.get("seconds"):
                r["speedup_vs_nuts"] = round(base / r["seconds"], 2)
    header = (f"{'groups':>8} {'rows':>9} {'method':>8} {'seconds':>9} {'vs nuts':>8} {'cov link':>8} "
              f"{'cov RD':>7} {'rmse link':>9} {'rmse RD':>8} {'R-hat':>6} {'ESS':>6}")
    print(header)
    for r in records:
        if r["status"] != "ok":
            print(f"{r['groups']:>8} {r['rows']:>9} {r['method']:>8}  {r['status']}")
            continue
        print(f"{r['groups']:>8} {r['rows']:>9} {r['method']:>8} {r['seconds']:>9.1f} "
              f"{r.get('speedup_vs_nuts', float('nan')):>8.2f} {r['coverage_link']:>8.3f} "
              f"{r['coverage_outcome']:>7.3f} {r['rmse_link']:>9.4f} {r['rmse_outcome']:>8.5f} "
              f"{r['max_rhat']:>6.3f} {r['min_ess_bulk']:>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"),
                                          "settings": vars(args), "results": records}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
