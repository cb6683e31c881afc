"""Decide: from posterior draws of effects to an action per group, with its value and risk.

Utility per row (stated by the user): treating earns ``benefit × effect − cost``,
control earns 0. For each group, from the retained joint posterior draws τ⁽ᵏ⁾ of
its effect, with U⁽ᵏ⁾ = benefit·τ⁽ᵏ⁾ − cost:

    action            treat if E[U] > 0 else control          (the Bayes action)
    expected_utility  max(E[U], 0)                             per row, of the action
    prob_best         P(U > 0) if treat else P(U ≤ 0)          P(the action is the better one)
    expected_loss     E[max(U, 0)] − max(E[U], 0)              what the action loses, on average,
                                                              against the better action in hindsight
    evpi              E[max(U, 0)] − max(E[U], 0)              the expected value of perfect information
                                                              (Raiffa & Schlaifer 1961), per row

For the Bayes action the expected loss *is* the EVPI; both are reported because
they answer different questions (how risky is acting now, how much would
certainty be worth). EVPI is ≈ 0 for groups whose evidence is decisive and
largest near break-even (effect ≈ cost / benefit) with a wide posterior. Totals
weight each group by its rows ``n`` (a fit's rows, or a transported target's).
The groups where more data is worth most are those with the largest
``n × evpi``, an upper bound on what any further study of that group could gain.

Example
-------
>>> decision = engine.decide(result, benefit=10.0, cost=2.0)          # doctest: +SKIP
>>> decision.table.filter(pl.col("action") == "treat")               # doctest: +SKIP
>>> decision.save("decision/")                                        # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine import provenance, record, validate
from engine.errors import SpecError

DECISION_COLUMNS = {
    "level": pl.String, "group": pl.String, "action": pl.String, "expected_utility": pl.Float64,
    "prob_best": pl.Float64, "expected_loss": pl.Float64, "evpi": pl.Float64,
}
TOP_GROUPS = 10
CHUNK = 4096  # groups per block: bounds the (draws, groups) float64 utilities held at once


@dataclass(frozen=True)
class Decision:
    """Per-group decisions (decisions.parquet), the summary (decisions.json) and provenance."""

    table: pl.DataFrame
    summary: dict
    provenance: dict

    def save(self, out_dir) -> Path:
        """Write decisions.parquet, decisions.json and provenance.json, atomically."""
        return record.write_folder(out_dir, {
            "decisions.parquet": self.table.write_parquet,
            "decisions.json": record.json_writer(self.summary),
            "provenance.json": record.json_writer(self.provenance),
        })

    def explain(self) -> str:
        return provenance.explain(self.provenance, self.summary)


def evaluate(effect_draws: np.ndarray, benefit: float, cost: float) -> dict:
    """Decision quantities for every column of ``effect_draws`` (draws, groups), per row.

    Example
    -------
    >>> out = evaluate(np.array([[1.0], [3.0]]), benefit=1.0, cost=1.0)
    >>> out["action"].tolist(), out["expected_utility"].tolist(), out["evpi"].tolist()
    (['treat'], [1.0], [0.0])
    """
    draws = np.asarray(effect_draws)
    groups = draws.shape[1]
    mean_u, p_positive, mean_best = np.empty(groups), np.empty(groups), np.empty(groups)
    for first in range(0, groups, CHUNK):
        block = benefit * draws[:, first:first + CHUNK].astype(np.float64) - cost
        mean_u[first:first + CHUNK] = block.mean(axis=0)
        p_positive[first:first + CHUNK] = (block > 0).mean(axis=0)
        mean_best[first:first + CHUNK] = np.maximum(block, 0.0).mean(axis=0)
    treat = mean_u > 0
    expected = np.where(treat, mean_u, 0.0)
    # E[max(U, 0)] ≥ max(E[U], 0) by Jensen; clip the rounding below zero.
    evpi = np.maximum(mean_best - expected, 0.0)
    return {"action": np.where(treat, "treat", "control"), "expected_utility": expected,
            "prob_best": np.where(treat, p_positive, 1.0 - p_positive), "expected_loss": evpi,
            "evpi": evpi, "expected_utility_treat": mean_u}


@dataclass(frozen=True)
class _Source:
    kind: str                 # "fit" or "transport"
    levels: dict              # level -> (keys list[str], n (groups,) float, draws (kept, groups))
    population: np.ndarray    # (kept,) draws of the population (or target) average effect
    population_rows: float
    block: dict               # provenance's "source"


def _from_fit(fit) -> _Source:
    from engine.transport import load_fit

    view = load_fit(fit, "decide")
    levels = {}
    for level in view.levels:
        table = view.effects(level)
        levels[level] = (table["group"].to_list(), table["n"].cast(pl.Float64).to_numpy(),
                         view.draws[f"effect.{level}"])
    return _Source("fit", levels, np.asarray(view.draws["ate"]), float(view.summary.get("n_rows") or 0),
                   view.source_block())


def _from_transport(moved) -> _Source:
    levels = {}
    if moved.groups.height:
        level = moved.groups["level"][0]
        levels[level] = (moved.groups["group"].to_list(), moved.groups["n"].to_numpy(),
                         moved.draws[f"effect.{level}"])
    source = moved.provenance.get("source", {})
    block = {"kind": "transport", "path": moved.path, "format": moved.provenance.get("format"),
             "created": moved.provenance.get("created"), "fit_path": source.get("path"),
             "cells_sha256": source.get("cells_sha256"), "spec": source.get("spec"),
             "verdict": moved.report.get("verdict")}
    return _Source("transport", levels, np.asarray(moved.draws["ate"]),
                   float(moved.report.get("composition", {}).get("target_rows") or 0), block)


def _load(source) -> _Source:
    from engine.api import Result
    from engine.transport import FitView, Transport, load_transport

    if isinstance(source, (Result, FitView)):
        return _from_fit(source)
    if isinstance(source, Transport):
        return _from_transport(source)
    if isinstance(source, (str, Path)):
        kind = provenance.read_record(source, expect=("fit", "transport"), command="decide").get("kind", "fit")
        return _from_fit(source) if kind == "fit" else _from_transport(load_transport(source, "decide"))
    raise SpecError(f"decide: expected a fit or a transport (a Result, a Transport, or a folder written by "
                    f"`causal-engine fit` or `causal-engine transport`), found {type(source).__name__}")


def decide(source, benefit: float, cost: float, *, level: str | None = None) -> Decision:
    """The action per group that maximizes posterior expected utility, with its risk and EVPI.

    Parameters
    ----------
    source : an ``engine.fit`` Result, an ``engine.transport`` Transport, or a folder written by
        ``causal-engine fit`` or ``causal-engine transport``
    benefit : value of one unit of effect, per row (finite)
    cost : cost of treating one row (finite)
    level : grouping level to decide for; default the deepest (a transport has only its leaf level)

    Example
    -------
    >>> decision = decide(result, benefit=10.0, cost=2.0, level="region")   # doctest: +SKIP
    >>> decision.summary["totals"]["evpi"]                                  # doctest: +SKIP
    """
    started = time.perf_counter()
    benefit = validate.check_finite_number("benefit", benefit)
    cost = validate.check_finite_number("cost", cost)
    src = _load(source)
    if level is not None and level not in src.levels:
        where = "this transport decides for" if src.kind == "transport" else "the fit's levels are"
        raise SpecError(f"level {level!r} is not a grouping level; {where} {list(src.levels) or 'none'} — pass one "
                        "of those with --level, or leave it out")
    chosen = level if level is not None else (list(src.levels)[-1] if src.levels else None)

    whole = evaluate(src.population[:, None], benefit, cost)
    population = {k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in whole.items()}
    population["rows"] = src.population_rows
    if chosen is None:
        # One population: the only decision is for everyone.
        keys, n = ["all"], np.array([src.population_rows])
        out = whole
        level_name = "population"
    else:
        keys, n, draws = src.levels[chosen]
        out = evaluate(draws, benefit, cost)
        level_name = chosen
    table = pl.DataFrame({"level": [level_name] * len(keys), "group": keys, "action": out["action"],
                          "expected_utility": out["expected_utility"], "prob_best": out["prob_best"],
                          "expected_loss": out["expected_loss"], "evpi": out["evpi"]},
                         schema=DECISION_COLUMNS)
    treat = out["action"] == "treat"
    total_evpi = n * out["evpi"]
    order = np.argsort(-total_evpi, kind="stable")[:TOP_GROUPS]
    summary = {
        "benefit": benefit, "cost": cost, "level": level_name, "source": src.kind,
        "utility": "per row: treat = benefit × effect − cost; control = 0",
        "break_even_effect": cost / benefit if benefit != 0 else None,
        "population": population,
        "totals": {
            "rows": float(n.sum()), "groups": len(keys),
            "treat_groups": int(treat.sum()), "control_groups": int((~treat).sum()),
            "treat_rows": float(n[treat].sum()),
            "expected_utility": float((n * out["expected_utility"]).sum()),
            "expected_utility_treat_all": float((n * out["expected_utility_treat"]).sum()),
            "expected_utility_population_action": float(n.sum() * population["expected_utility"]),
            "evpi": float(total_evpi.sum()),
        },
        "value_of_information": [
            {"level": level_name, "group": keys[i], "n": float(n[i]), "action": str(out["action"][i]),
             "prob_best": float(out["prob_best"][i]), "evpi": float(out["evpi"][i]),
             "evpi_total": float(total_evpi[i])}
            for i in order if total_evpi[i] > 0],
        "draws": int(src.population.shape[0]),
    }
    prov = {
        "format": provenance.FORMAT, "kind": "decision", "created": provenance.now(),
        "source": src.block,
        "options": {"benefit": benefit, "cost": cost, "level": level_name},
        "draws": summary["draws"],
        "versions": provenance.versions(),
        "timings": {"total_s": round(time.perf_counter() - started, 3)},
    }
    return Decision(table=table, summary=summary, provenance=prov)
