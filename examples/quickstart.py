"""The quick start: simulate an experiment with long-tail groups, fit, compare with the truth.

Run with `make demo` (or `python examples/quickstart.py`). It takes about a
minute on two CPU cores, most of it compiling and sampling.
"""
from __future__ import annotations

import sys
import time

import polars as pl

import engine


def main(out_dir: str = "demo-out") -> int:
    sim = engine.simulate(rows=30_000, groups=1_000, levels=["country", "region"], seed=7, covariate=True)
    countries = sim.params["level_sizes"][0]
    print(f"Simulated a randomised experiment: 30,000 rows in 1,000 regions nested in {countries} countries,")
    print("with long-tail region sizes and a pre-period covariate 'pre'.")
    sizes = sim.rows.group_by("region").len()["len"]
    print(f"  rows per region: median {sizes.median():.0f}, max {sizes.max()}, "
          f"{(sizes <= 2).sum()} regions with 1–2 rows")

    print("\nFitting the hierarchical effects model (method auto → exact; 4 chains × 1000 draws)...")
    started = time.perf_counter()
    result = engine.fit(sim.rows, outcome="y", treatment="treated", groups=["country", "region"],
                        covariates=["pre"], seed=0)
    seconds = time.perf_counter() - started
    result.save(out_dir)

    ate, new, diag = result.ate(), result.new_group(), result.summary["diagnostics"]
    print(f"  done in {seconds:.1f} s; diagnostics {'ok' if diag['ok'] else 'NOT OK'} "
          f"(max R-hat {diag['max_rhat']:.3f}, min bulk ESS {diag['min_ess_bulk']:.0f}, "
          f"{diag['divergences']} divergences)")
    print(f"\nPopulation effect (ATE):  {ate['mean']:+.3f}   90% interval [{ate['lower']:+.3f}, {ate['upper']:+.3f}]"
          f"   truth {sim.ate:+.3f}")
    print(f"A new country's effect:   {new['mean']:+.3f}   90% interval [{new['lower']:+.3f}, {new['upper']:+.3f}]")

    truth = sim.truth.select("level", "group", pl.col("effect").alias("true"))
    regions = result.effects("region").join(truth, on=["level", "group"])
    covered = regions.select(((pl.col("lower") <= pl.col("true")) & (pl.col("true") <= pl.col("upper"))).mean()).item()
    columns = ["group", "parent", "n", "mean", "lower", "upper", "true"]
    with pl.Config(tbl_rows=6, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   float_precision=3):
        print("\nMost affected regions (by posterior mean):")
        print(regions.sort("mean", descending=True).head(5).select(columns))
        print("Least affected regions:")
        print(regions.sort("mean").head(5).select(columns))
    print(f"\n90% intervals cover the true region effect for {covered:.1%} of {regions.height} regions.")
    print(f"Wrote {out_dir}/effects.parquet, summary.json, provenance.json, draws.npz "
          f"(try: .venv/bin/causal-engine explain {out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
