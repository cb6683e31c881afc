"""Exact (collapsed) inference at scale, side by side with its baselines, in one run.

For each size: simulate a long-tail experiment (rows = ROWS_PER_GROUP × groups), write it to
Parquet, then measure on the same machine in the same process:

- ``polars_cells_s``: a plain Polars ``group_by().agg()`` computing the same cell statistics
  from the file (the floor any engine must read the data in);
- ``exact``: the whole ``engine.fit`` from the file (read, reduce, compile, sample, summarise),
  its min bulk ESS over hyperparameters and ATE, and ESS per second;
- ``nuts`` (full joint model, every group effect sampled), when ``--nuts`` names the size.

Usage:
    python benchmarks/exact.py --groups 1000,10000 --nuts 1000,10000
    python benchmarks/exact.py --groups 1000000 --draws 250 --chains 4 --again 1

Prints a table and writes benchmarks/results/exact.json. The machine is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import polars as pl

ROWS_PER_GROUP = 5


def polars_cells_seconds(path: str) -> float:
    y = pl.col("y")
    started = time.perf_counter()
    (pl.scan_parquet(path).group_by("group", "treated")
     .agg(pl.len(), y.mean(), (y.var(ddof=0) * pl.len()).alias("m2")).collect())
    return time.perf_counter() - started


def fit_seconds(path: str, method: str, draws: int, warmup: int, chains: int) -> dict:
    import engine

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = engine.fit(path, outcome="y", treatment="treated", groups=["group"], method=method,
                            draws=draws, warmup=warmup, chains=chains, seed=0)
    seconds = time.perf_counter() - started
    d = result.summary["diagnostics"]
    timings = result.summary["timings"]
    return {"seconds": round(seconds, 2), "fit_s": timings["fit_s"], "reduce_s": timings["reduce_s"],
            "sample_s": timings.get("sample_s"), "downward_s": timings.get("downward_s"),
            "marginal": result.posterior.sampler.get("marginal"),
            "min_ess_bulk": d["min_ess_bulk"], "max_rhat": d["max_rhat"], "divergences": d["divergences"],
            "ess_per_s": round(d["min_ess_bulk"] / seconds, 2) if d["min_ess_bulk"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="1000,10000", help="comma-separated group counts")
    parser.add_argument("--nuts", default="", help="sizes at which to also run full joint NUTS")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--again", type=int, default=0,
                        help="fit each size this many more times in the process (warm fits, reported apart)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "exact.json"))
    args = parser.parse_args()

    import engine
    import jax

    sizes = [int(g) for g in args.groups.split(",") if g]
    nuts_sizes = {int(g) for g in args.nuts.split(",") if g}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for groups in sizes:
            rows = ROWS_PER_GROUP * groups
            path = os.path.join(tmp, f"rows-{groups}.parquet")
            engine.simulate(rows=rows, groups=groups, seed=1).rows.write_parquet(path)
            run = {"groups": groups, "rows": rows, "polars_cells_s": round(polars_cells_seconds(path), 3)}
            run["exact"] = fit_seconds(path, "exact", args.draws, args.warmup, args.chains)
            # Later fits of the same file reuse this process's compiled programs (a warm fit).
            run["exact_again"] = [fit_seconds(path, "exact", args.draws, args.warmup, args.chains)
                                  for _ in range(args.again)]
            run["exact_vs_polars"] = round(run["exact"]["seconds"] / run["polars_cells_s"], 1)
            if groups in nuts_sizes:
                run["nuts"] = fit_seconds(path, "nuts", args.draws, args.warmup, args.chains)
                if run["nuts"]["ess_per_s"] and run["exact"]["ess_per_s"]:
                    run["ess_per_s_ratio"] = round(run["exact"]["ess_per_s"] / run["nuts"]["ess_per_s"], 1)
            runs.append(run)
            print(json.dumps(run), flush=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}
    report = {"machine": machine, "settings": vars(args), "runs": runs,
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'groups':>9} {'rows':>9} {'polars s':>9} {'exact s':>9} {'ratio':>6} {'ESS':>7} {'ESS/s':>8} "
          f"{'nuts s':>8} {'nuts ESS/s':>10} {'ESS/s ×':>8}")
    for r in runs:
        e, n = r["exact"], r.get("nuts", {})
        print(f"{r['groups']:>9} {r['rows']:>9} {r['polars_cells_s']:>9.3f} {e['seconds']:>9.1f} "
              f"{r['exact_vs_polars']:>6} {e['min_ess_bulk'] or 0:>7.0f} {e['ess_per_s'] or 0:>8.1f} "
              f"{n.get('seconds', float('nan')):>8.1f} {n.get('ess_per_s') or float('nan'):>10.2f} "
              f"{r.get('ess_per_s_ratio', float('nan')):>8}")
    for r in runs:
        for again in r["exact_again"]:
            print(f"{r['groups']:>9} warm fit {again['seconds']:.2f} s ({again['seconds'] / r['polars_cells_s']:.1f}× "
                  f"the group-by; sample {again['sample_s']} s, downward {again['downward_s']} s)")


if __name__ == "__main__":
    main()
