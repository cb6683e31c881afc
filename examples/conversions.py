"""A conversion experiment across 2,000 stores: a binary outcome with low base rates.

Simulates a randomised test (base conversion rates from about 1% to 30% across stores,
a log odds ratio around 0.3, long-tail store sizes), fits it with the default `laplace`
method, and compares the risk differences and log odds ratios with the truth. Then fits the
same data with full NUTS (the reference) and with `svi`, and prints the three side by side.

Run with `python examples/conversions.py [OUT_DIR]`; about two minutes on two CPU cores.
"""
from __future__ import annotations

import sys
import time
import warnings

import polars as pl

import engine


def main(out_dir: str = "conversions-out") -> int:
    sim = engine.simulate(rows=60_000, groups=2_000, seed=3, family="bernoulli", baseline_mean=-2.5,
                          baseline_scale=1.0, effect_mean=0.3, effect_scale=0.3)
    sizes = sim.rows.group_by("group").len()["len"]
    print(f"Simulated 60,000 visits in 2,000 stores: {sim.rows['y'].mean():.1%} converted; rows per store "
          f"median {sizes.median():.0f}, max {sizes.max()}, {(sizes <= 5).sum()} stores with ≤ 5 rows.")
    truth = sim.truth.select("group", pl.col("effect").alias("true_log_or"),
                             pl.col("outcome_effect").alias("true_rd"))
    fits = {}
    for method in ("laplace", "svi", "nuts"):
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits[method] = engine.fit(sim.rows, outcome="y", treatment="treated", groups=["group"],
                                      family="bernoulli", method=method, seed=0)
        print(f"  {method:8s} {time.perf_counter() - started:6.1f} s   "
              f"diagnostics {'ok' if fits[method].summary['diagnostics']['ok'] else 'NOT OK'}")
    fits["laplace"].save(out_dir)

    print(f"\nTrue average risk difference over the visits: {sim.ate:+.4f}")
    print(f"{'method':8s} {'ATE (risk diff.)':>28s} {'ATE (log OR)':>26s} {'store coverage':>15s} "
          f"{'RMSE log OR':>12s}")
    for method, result in fits.items():
        ate, link = result.ate(), result.summary["ate_link"]
        stores = result.effects("group").join(truth, on="group")
        coverage = stores.select(((pl.col("link_lower") <= pl.col("true_log_or"))
                                  & (pl.col("true_log_or") <= pl.col("link_upper"))).mean()).item()
        rmse = stores.select(((pl.col("link_mean") - pl.col("true_log_or")) ** 2).mean().sqrt()).item()
        print(f"{method:8s} {ate['mean']:+.4f} [{ate['lower']:+.4f}, {ate['upper']:+.4f}]   "
              f"{link['mean']:+.3f} [{link['lower']:+.3f}, {link['upper']:+.3f}]   {coverage:14.1%} {rmse:12.3f}")

    stores = fits["laplace"].effects("group").join(truth, on="group")
    with pl.Config(tbl_rows=6, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                   float_precision=3):
        print("\nLargest risk differences (laplace):")
        print(stores.sort("mean", descending=True).head(5)
              .select("group", "n", "mean", "lower", "upper", "true_rd", "link_mean", "true_log_or"))
    print(f"\nWrote {out_dir}/ (effects.parquet: mean/lower/upper are risk differences, link_* log odds ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
