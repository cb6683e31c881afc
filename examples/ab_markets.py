"""An A/B test across markets: where to launch, where to keep testing, what a rollout is worth.

A new checkout flow was A/B tested in 60 markets nested in regions (simulated,
so the truth is known). Revenue per user is the outcome; the flow costs a
licence fee per user. The questions, answered from one fit:

1. Can the test be trusted? (sample ratio, placebo)
2. In which markets should the flow launch? (`decide` per market: the action
   maximizing expected profit, P(best), and the expected value of perfect
   information — where extending the test is worth most)
3. What is the rollout worth next quarter, when the user mix differs and some
   markets were never tested? (`transport` to a table of user counts per market,
   then `decide` on the transported effect)

The same with the command line:

    causal-engine fit rows.parquet --outcome revenue --treatment variant --treated-value B \\
        --group region --group market --out fit
    causal-engine refute fit
    causal-engine decide fit --benefit 1 --cost 0.15 --out launch
    causal-engine transport fit --target plan.parquet --count users --out rollout
    causal-engine decide rollout --benefit 1 --cost 0.15 --out rollout-decision

Run: `python examples/ab_markets.py [OUT_DIR]` (about a minute on two CPU cores).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import polars as pl

import engine

FEE = 0.15  # licence fee per user; one unit of revenue is worth 1


def experiment():
    sim = engine.simulate(rows=20_000, groups=60, levels=["region", "market"], effect_mean=0.2,
                          effect_scale=0.3, baseline_mean=10.0, noise=2.0, zipf=0.8, seed=5)
    rows = sim.rows.with_columns(
        variant=pl.when(pl.col("treated") == 1).then(pl.lit("B")).otherwise(pl.lit("A"))
    ).drop("treated").rename({"y": "revenue"})
    return rows, sim


def rollout_plan(rows: pl.DataFrame, rng) -> pl.DataFrame:
    """Users per market next quarter: tested markets in a new mix, plus three untested markets."""
    markets = rows.group_by("region", "market").len().sort("market")
    users = rng.integers(1_000, 20_000, markets.height)
    plan = markets.select("region", "market").with_columns(pl.Series("users", users))
    first_region = plan["region"][0]
    new = pl.DataFrame({"region": [first_region, first_region, "region-new"],
                        "market": ["market-new-1", "market-new-2", "market-new-3"],
                        "users": [8_000, 5_000, 6_000]})
    return pl.concat([plan, new.cast(plan.schema)])


def main(out_dir: str = "ab-out") -> int:
    started = time.perf_counter()
    rng = np.random.default_rng(3)
    rows, sim = experiment()
    print(f"A/B test: {rows.height} users in {rows['market'].n_unique()} markets, "
          f"{rows['region'].n_unique()} regions; variant B is the new checkout.")
    result = engine.fit(rows, outcome="revenue", treatment="variant", treated_value="B",
                        groups=["region", "market"], draws=300, warmup=300, chains=2, seed=0)
    result.save(f"{out_dir}/fit")
    ate, checks = result.ate(), result.summary["checks"]
    srm = checks["sample_ratio"]
    print(f"  effect on revenue per user {ate['mean']:+.3f} [{ate['lower']:+.3f}, {ate['upper']:+.3f}] "
          f"(truth {sim.ate:+.3f})")
    print(f"  sample ratio: {srm['observed_share']:.2%} on B vs 50% designed, p = {srm['p_value']:.2g} → "
          f"{'MISMATCH' if srm['flag'] else 'ok'}")
    placebo = engine.refute(result, rows, draws=300, warmup=300, chains=2)
    print(f"  placebo (variant shuffled within markets): {placebo['placebo']['mean']:+.3f} "
          f"[{placebo['placebo']['lower']:+.3f}, {placebo['placebo']['upper']:+.3f}] → "
          f"{'passed' if placebo['passed'] else 'FAILED'}")

    launch = engine.decide(result, benefit=1.0, cost=FEE, level="market")
    launch.save(f"{out_dir}/launch")
    table = launch.table
    truth = sim.truth.filter(pl.col("level") == "market").select(pl.col("group"), pl.col("effect"))
    checked = table.join(truth, on="group").with_columns(
        right=(pl.col("action") == pl.when(pl.col("effect") > FEE).then(pl.lit("treat")).otherwise(pl.lit("control"))))
    sure = checked.filter(pl.col("prob_best") > 0.95)
    print(f"\nLaunch per market (fee {FEE} per user): launch in {(table['action'] == 'treat').sum()} of "
          f"{table.height}; {sure.height} decided with P(best) > 0.95, of which {sure['right'].sum()} match the "
          "true best action")
    print("  where extending the test is worth most (EVPI, total over the market's users):")
    for g in launch.summary["value_of_information"][:4]:
        print(f"    {g['group']}: {g['action']} now, P(best) {g['prob_best']:.2f}, EVPI {g['evpi_total']:.1f}")

    plan = rollout_plan(rows, rng)
    moved = engine.transport(result, plan, count="users")
    moved.save(f"{out_dir}/rollout")
    r = moved.report
    print(f"\nRollout next quarter: {plan['users'].sum():,} users in {plan.height} markets "
          f"({r['unseen_share']:.0%} in untested markets)")
    print(f"  transported effect {r['ate']['mean']:+.3f} [{r['ate']['lower']:+.3f}, {r['ate']['upper']:+.3f}], "
          f"verdict {r['verdict'].upper()}")
    decision = engine.decide(moved, benefit=1.0, cost=FEE)
    decision.save(f"{out_dir}/rollout-decision")
    pop, totals = decision.summary["population"], decision.summary["totals"]
    print(f"  launch everywhere: {pop['action']} (expected profit {pop['expected_utility']:.3f} per user); "
          f"launch market by market: expected profit {totals['expected_utility']:,.0f} vs "
          f"{totals['expected_utility_population_action']:,.0f} for one decision for all; "
          f"value of perfect information {totals['evpi']:,.0f}")
    print(f"\nWrote {out_dir}/fit, launch, rollout, rollout-decision ({time.perf_counter() - started:.0f} s). "
          f"Try: causal-engine explain {out_dir}/rollout-decision")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
