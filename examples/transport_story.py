"""From an estimate to an action: a study, a target measured with another instrument, a decision.

The story (all data simulated, so the truth is known):

1. A randomised study in 24 clinics measures a treatment's effect on a recovery
   score. Patients' risk marker is read on the study's imaging machine; the
   model adjusts for it. The effect differs between clinics.
2. A health system wants to roll the treatment out in its own clinics: some of
   the study's clinics (mostly those where the effect was small) and two clinics
   the study never saw. Its marker readings come from a newer machine that
   reads higher.
3. `transport` re-weights the clinic effects to the system's composition and
   flags the marker's shift: the target lies outside the data the effect was
   estimated on. A calibration check finds the new machine reads 3 units high;
   recalibrated, the target lies inside the study's range and the verdict is ok.
4. `decide` with a value per unit of recovery and a cost per patient: the
   study population would be treated, the target population should not be —
   the decision changes because the population changes, and EVPI says which
   clinics are worth studying further.

Run: `python examples/transport_story.py [OUT_DIR]` (about a minute on two CPU
cores). Then try `causal-engine explain OUT_DIR/transport`.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import polars as pl

import engine

BENEFIT = 100.0   # value of one point of recovery score, per patient
COST = 10.0       # cost of treating one patient: break-even at an effect of 0.1 points
NEW_MACHINE_OFFSET = 3.0


def study_population():
    sim = engine.simulate(rows=6_000, groups=24, levels=["clinic"], covariate=True, effect_mean=0.5,
                          effect_scale=0.6, zipf=0.5, seed=11)
    return sim.rows.rename({"pre": "marker"}), sim.truth.filter(pl.col("level") == "clinic")


def target_population(truth: pl.DataFrame, rng) -> tuple[pl.DataFrame, float]:
    """The health system's patients: 8 study clinics (the smallest effects) and 2 new ones."""
    chosen = truth.sort("effect").head(8)
    new = pl.DataFrame({"group": ["clinic-new-1", "clinic-new-2"],
                        "effect": 0.5 + 0.6 * rng.standard_normal(2)})   # drawn as the study's clinics were
    sizes = {**{g: 400 for g in chosen["group"]}, "clinic-new-1": 150, "clinic-new-2": 150}
    clinics = np.repeat(list(sizes), list(sizes.values()))
    # The marker as the study's machine would read it, then as the new machine does.
    marker = 2.0 * rng.standard_normal(clinics.size)
    target = pl.DataFrame({"clinic": clinics, "marker": marker + NEW_MACHINE_OFFSET})
    effects = pl.concat([chosen.select("group", "effect"), new])
    weights = pl.DataFrame({"group": list(sizes), "n": list(sizes.values())}).join(effects, on="group")
    true_effect = float((weights["n"] * weights["effect"]).sum() / weights["n"].sum())
    return target, true_effect


def show_decision(title: str, decision) -> None:
    pop, totals = decision.summary["population"], decision.summary["totals"]
    print(f"  {title}: {pop['action'].upper()} everyone — expected utility {pop['expected_utility']:.1f} per patient, "
          f"P(best) {pop['prob_best']:.2f}, EVPI {pop['evpi']:.2f} per patient")
    print(f"    per clinic: treat {totals['treat_groups']}, control {totals['control_groups']}; "
          f"total EVPI {totals['evpi']:,.0f}")
    for g in decision.summary["value_of_information"][:3]:
        print(f"    more data is worth most in {g['group']}: EVPI {g['evpi_total']:,.0f} over {g['n']:.0f} patients")


def main(out_dir: str = "story-out") -> int:
    rng = np.random.default_rng(2024)
    started = time.perf_counter()
    rows, truth = study_population()
    print(f"1. The study: {rows.height} patients in 24 clinics, randomised; outcome 'y' (recovery score), "
          "marker read on the study machine.")
    result = engine.fit(rows, outcome="y", treatment="treated", groups=["clinic"], covariates=["marker"],
                        draws=300, warmup=300, chains=2, seed=0)
    result.save(f"{out_dir}/fit")
    ate, checks = result.ate(), result.summary["checks"]
    true_ate = float((truth["n"] * truth["effect"]).sum() / truth["n"].sum())
    print(f"   effect in the study population {ate['mean']:.3f} [{ate['lower']:.3f}, {ate['upper']:.3f}] "
          f"(truth {true_ate:.3f}); trust checks {'ok' if checks['ok'] else 'NOT OK'} (treated share "
          f"{checks['sample_ratio']['observed_share']:.1%}, marker balance SMD "
          f"{checks['balance']['covariates']['marker']['smd']:+.3f})")

    target, true_target = target_population(truth, rng)
    print(f"\n2. The target: {target.height} patients in {target['clinic'].n_unique()} clinics "
          "(8 from the study, 2 new), marker read on the new machine.")
    moved = engine.transport(result, target)
    r = moved.report
    print(f"   transported effect {r['ate']['mean']:.3f} [{r['ate']['lower']:.3f}, {r['ate']['upper']:.3f}] "
          f"(truth {true_target:.3f}); {r['unseen_share']:.0%} of patients in clinics the study never saw")
    shift = r["shift"]["marker"]
    print(f"   verdict {r['verdict'].upper()}: marker SMD {shift['smd']:+.2f}, {shift['outside_share']:.0%} of "
          "patients outside the study's range")
    for message in r["messages"][:1]:
        print(f"   ! {message}")

    print(f"\n3. A calibration check: the new machine reads {NEW_MACHINE_OFFSET:g} units high. Recalibrated:")
    recalibrated = target.with_columns(pl.col("marker") - NEW_MACHINE_OFFSET)
    moved = engine.transport(result, recalibrated)
    moved.save(f"{out_dir}/transport")
    r = moved.report
    shift = r["shift"]["marker"]
    print(f"   verdict {r['verdict'].upper()}: marker SMD {shift['smd']:+.2f}, {shift['outside_share']:.1%} outside; "
          f"transported effect unchanged at {r['ate']['mean']:.3f} (the model's marker slope is shared, so the "
          "effect does not depend on it — now that assumption is not stretched beyond the data)")

    print(f"\n4. The decision, valuing a point of recovery at {BENEFIT:g} and a treatment at {COST:g} "
          f"(break-even effect {COST / BENEFIT:g}):")
    in_study = engine.decide(result, BENEFIT, COST)
    in_target = engine.decide(moved, BENEFIT, COST)
    in_target.save(f"{out_dir}/decision")
    show_decision("study population", in_study)
    show_decision("target population", in_target)
    changed = in_study.summary["population"]["action"] != in_target.summary["population"]["action"]
    print(f"\n   The decision {'CHANGES' if changed else 'does not change'} between the study and the target: "
          "the effect was estimated correctly, but the target is made of other clinics.")
    print(f"\nWrote {out_dir}/fit, {out_dir}/transport, {out_dir}/decision ({time.perf_counter() - started:.0f} s). "
          f"Try: causal-engine explain {out_dir}/transport")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
