"""Transport: the effect for a target population, and whether the transfer is valid.

Post-stratification (Pearl & Bareinboim 2011; Gelman & Little 1997 for
multilevel regression and post-stratification): the fitted model gives every
group's effect τ_g; a target population is a composition, weights w_g over
groups (its rows, or a table of group counts); its average effect is

    τ_target = Σ_g w_g τ_g                                  (one value per posterior draw)

computed draw by draw from the fit's retained *joint* draws (``draws.npz``), so
that its sd carries the correlation between groups. A target group the fit
never saw gets its predictive distribution: under its nearest seen ancestor
(a new region in a known country) the ancestor's draw plus N(0, Σ E[σ_τ,ℓ²])
over the levels below it; with no seen ancestor the fit's ``new_group`` draw
(an unseen top-level group) plus the same for the levels below. The ``new_group``
draw is shared by every unseen top-level group within a posterior draw: as if
they were one new group, which is conservative (too wide, never too narrow)
when the unseen rows spread over many groups. E[σ²] is the posterior mean of
each level's effect scale squared plus its variance (summary.json ``hyper``).

Covariates in the model have shared slopes, so the effect does not depend on
them: transport re-weights group effects only. What the covariates tell is
whether the target lies where the fit saw data: the **shift report** gives per
covariate the standardized mean difference between the target and the fit's
rows, (x̄_target − x̄_fit) / s_fit, and the share of target rows outside the
range [min, max] the fit observed. The verdict is ``warn`` when any of

    |SMD| > max_smd (default 0.25)            a shifted population, or a different instrument
    outside_share > max_outside (0.05)        extrapolation beyond the observed range
    unseen_share > max_unseen (0.2)           much of the target rests on the new-group prediction

holds, or when the covariates could not be checked (a target given as counts);
else ``ok``. The thresholds are options (``--max-smd``, ``--max-outside``,
``--max-unseen``).

Example
-------
>>> moved = engine.transport(result, target_rows)            # doctest: +SKIP
>>> moved.report["ate"], moved.report["verdict"]             # doctest: +SKIP
>>> moved.save("transported/")                               # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine import provenance, record, validate
from engine.errors import DataError, SchemaError, SpecError

DRAWS_BUDGET_BYTES = 256 * 2**20
DEFAULT_THRESHOLDS = {"max_smd": 0.25, "max_outside": 0.05, "max_unseen": 0.2}
TARGET_GROUP_COLUMNS = {
    "level": pl.String, "group": pl.String, "parent": pl.String, "n": pl.Float64, "seen": pl.Boolean,
    "basis": pl.String, "mean": pl.Float64, "sd": pl.Float64, "lower": pl.Float64, "upper": pl.Float64,
}


# ---------------------------------------------------------------- reading a fit


@dataclass(frozen=True)
class FitView:
    """What transport and decide read from a fit: its summaries, effects and retained joint draws.

    ``draws`` holds ``ate`` (kept,), ``new_group`` (kept,) and ``effect.LEVEL`` (kept, groups),
    row k of every array the same posterior draw, columns in the order of ``effects(LEVEL)``.
    """

    path: str | None
    summary: dict
    provenance: dict
    effects_table: pl.DataFrame
    draws: dict

    @property
    def levels(self) -> list[str]:
        return list(self.summary["levels"])

    @property
    def covariates(self) -> list[str]:
        return list(self.provenance.get("spec", {}).get("covariates", []))

    def effects(self, level: str) -> pl.DataFrame:
        return self.effects_table.filter(pl.col("level") == level)

    def source_block(self) -> dict:
        """How provenance names this fit."""
        spec = self.provenance.get("spec", {})
        return {"kind": "fit", "path": self.path, "format": self.provenance.get("format"),
                "created": self.provenance.get("created"),
                "cells_sha256": self.provenance.get("inputs", {}).get("cells_sha256"),
                "spec": {k: spec.get(k) for k in ("outcome", "treatment", "groups", "covariates", "method")}}


def load_fit(fit, command: str = "transport") -> FitView:
    """A fit from an ``engine.fit`` Result or from a folder written by ``causal-engine fit``."""
    from engine.api import Result

    if isinstance(fit, FitView):
        return fit
    if isinstance(fit, Result):
        post = fit.posterior
        index = post.groups[0].draw_index if post.groups else np.arange(post.ate.size)
        draws = {"ate": post.ate.reshape(-1)[index], "new_group": post.new_group.reshape(-1)[index]}
        for level, group in zip(fit.summary["levels"], post.groups):
            draws[f"effect.{level}"] = group.draws
        return FitView(None, fit.summary, fit.provenance, fit.effects_table, draws)
    if not isinstance(fit, (str, Path)):
        raise SpecError(f"{command}: expected a fit (an engine.fit Result or a folder written by `causal-engine "
                        f"fit`), found {type(fit).__name__}")
    folder = Path(fit)
    prov = provenance.read_record(folder, expect=("fit",), needs=("effects.parquet", "draws.npz"),
                                  command=command)
    summary, effects, draws = _read_outputs(folder, "summary.json", "effects.parquet", command, "fit")
    for level in summary.get("levels", []):
        key = f"effect.{level}"
        rows = effects.filter(pl.col("level") == level).height
        if key not in draws or draws[key].shape[1] != rows or draws[key].shape[0] != draws["ate"].shape[0]:
            raise DataError(f"{command}: {str(folder)!r}: draws.npz does not match effects.parquet for level "
                            f"{level!r} (expected {rows} groups); the folder is damaged — rerun `causal-engine fit`")
    return FitView(str(folder.resolve()), summary, prov, effects, draws)


# ---------------------------------------------------------------- the result value


@dataclass(frozen=True)
class Transport:
    """A transported effect: the report (transport.json), the target's groups and their draws.

    ``draws`` holds ``ate`` (kept,) and, with grouping levels, ``effect.LEVEL`` (kept, target
    groups) for the leaf level, columns in the order of ``groups``.
    """

    report: dict
    groups: pl.DataFrame
    draws: dict
    provenance: dict
    path: str | None = None  # the folder it was read from, if any

    def ate(self) -> dict:
        return dict(self.report["ate"])

    def save(self, out_dir) -> Path:
        """Write transport.json, target_groups.parquet, draws.npz and provenance.json, atomically."""
        def write_draws(path):
            with open(path, "wb") as handle:
                np.savez(handle, **self.draws)

        return record.write_folder(out_dir, {
            "transport.json": record.json_writer(self.report),
            "target_groups.parquet": self.groups.write_parquet,
            "draws.npz": write_draws,
            "provenance.json": record.json_writer(self.provenance),
        })

    def explain(self) -> str:
        return provenance.explain(self.provenance, self.report)


def _read_outputs(folder: Path, json_name: str, table_name: str, command: str, kind: str):
    """A result folder's JSON report, its table and its draws, or a DataError saying what to rerun."""
    import json

    try:
        report = json.loads((folder / json_name).read_text())
        table = pl.read_parquet(folder / table_name)
        with np.load(folder / "draws.npz") as saved:
            draws = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"{command}: cannot read the {kind} in {str(folder)!r} ({exc}); rerun "
                        f"`causal-engine {kind}`") from None
    return report, table, draws


def load_transport(folder, command: str = "decide") -> Transport:
    folder = Path(folder)
    prov = provenance.read_record(folder, expect=("transport",), needs=("target_groups.parquet", "draws.npz"),
                                  command=command)
    report, groups, draws = _read_outputs(folder, "transport.json", "target_groups.parquet", command, "transport")
    return Transport(report, groups, draws, prov, str(folder.resolve()))


# ---------------------------------------------------------------- checks at the edge


def check_thresholds(max_smd, max_outside, max_unseen) -> dict:
    out = {}
    for name, value, upper in (("max_smd", max_smd, math.inf), ("max_outside", max_outside, 1.0),
                               ("max_unseen", max_unseen, 1.0)):
        number = validate.check_finite_number(name, value)
        if not 0.0 <= number <= upper:
            raise SpecError(f"{name}: expected a number in [0, {upper:g}], found {value!r} — pass a threshold such "
                            f"as {DEFAULT_THRESHOLDS[name]}")
        out[name] = number
    return out


def _read_target(target, levels, covariates, count):
    """The target's rows (levels + covariates) or counts (levels + count), checked."""
    source = validate.resolve_source(target)
    schema = source.frame.collect_schema()
    available = ", ".join(list(schema.names())[:20])
    for g in levels:
        if g not in schema:
            raise SchemaError(f"target is missing grouping column {g!r}, which the fit used; the target has "
                              f"columns: {available} — add {g!r} (or rename the target's column to it)")
        if schema[g].is_float():
            raise SchemaError(f"target grouping column {g!r} has type {schema[g]}; expected strings or integers "
                              "as in the fit — cast it")
    if count is not None:
        if count not in schema:
            raise SchemaError(f"target count column {count!r} (--count) not found; the target has columns: "
                              f"{available} — check the spelling")
        if not schema[count].is_numeric():
            raise SchemaError(f"target count column {count!r} has type {schema[count]}; expected a number of rows "
                              "per group")
        columns = [*levels, count]
    else:
        for x in covariates:
            if x not in schema:
                raise SchemaError(f"target is missing covariate column {x!r}, which the fit adjusted for; the "
                                  f"target has columns: {available} — add {x!r}, or give the target as a table "
                                  "of group counts with --count COL (the shift is then not checked)")
            if not (schema[x].is_numeric() or schema[x] == pl.Boolean):
                raise SchemaError(f"target covariate column {x!r} has type {schema[x]}; expected a number as in "
                                  "the fit — convert it")
        columns = [*levels, *covariates]
    if not columns:
        # No grouping and no covariates: the target's size is all there is.
        frame = source.frame.select(pl.len().alias("_rows")).collect()
        return source, pl.DataFrame({"_n": [float(frame["_rows"][0])]}), int(frame["_rows"][0])
    try:
        table = source.frame.select(columns).collect()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"cannot read the target: {type(exc).__name__}: {exc}") from None
    if table.height == 0:
        raise DataError("the target has no rows; pass the target population's rows or group counts")
    for g in levels:
        if table[g].null_count():
            raise DataError(f"target grouping column {g!r} has {table[g].null_count()} missing key(s); fill or "
                            "drop those rows")
    if count is not None:
        c = table[count].cast(pl.Float64)
        bad = table.filter(c.is_null() | c.is_nan() | c.is_infinite())
        if bad.height:
            raise DataError(f"target count column {count!r} has {bad.height} missing or non-finite value(s); "
                            "a count must be a finite number ≥ 0 — fix those rows")
        negative = table.filter(c < 0)
        if negative.height:
            first = negative.row(0, named=True)
            where = f" (first for {levels[-1]!r} = {first[levels[-1]]!r})" if levels else ""
            raise DataError(f"target count column {count!r} has {negative.height} negative value(s){where}, "
                            f"e.g. {first[count]}; a count of rows must be ≥ 0 — fix those rows")
        if float(c.sum()) <= 0:
            raise DataError(f"target count column {count!r} sums to 0; the target needs at least one row")
        table = table.with_columns(c.alias("_n"))
    else:
        for x in covariates:
            v = table[x].cast(pl.Float64)
            bad = int((v.is_null() | v.is_nan() | v.is_infinite()).sum())
            if bad:
                raise DataError(f"target covariate column {x!r} has {bad} missing, NaN or infinite value(s); "
                                "drop or fix those rows")
        table = table.with_columns(pl.lit(1.0).alias("_n"))
    return source, table, table.height


# ---------------------------------------------------------------- post-stratification


def _scale_variance(summary: dict, level: str) -> tuple[float, bool]:
    """E[σ_τ,level²] from the posterior mean and sd of the level's effect scale."""
    block = summary.get("hyper", {}).get(f"effect_scale.{level}")
    if not block or block.get("mean") is None:
        return 0.0, False
    return float(block["mean"]) ** 2 + float(block.get("sd") or 0.0) ** 2, True


def _composition(fit: FitView, table: pl.DataFrame, rng, kept_index):
    """Target leaf groups, their weights and per-draw effects (kept, target groups)."""
    levels = fit.levels
    leaf = levels[-1]
    keyed = table.with_columns([pl.col(g).cast(pl.String) for g in levels])
    groups = keyed.group_by(levels).agg(pl.col("_n").sum()).filter(pl.col("_n") > 0).sort(levels)
    if groups.height == 0:
        raise DataError("every target group has count 0; the target needs at least one row")
    twice = groups.filter(pl.col(leaf).is_duplicated())
    if twice.height:
        key = twice[leaf][0]
        above = twice.filter(pl.col(leaf) == key)[levels[-2]].to_list()
        raise DataError(f"target group {key!r} of level {leaf!r} sits under {len(above)} different {levels[-2]!r} "
                        f"groups ({', '.join(map(repr, above[:3]))}); each group must have one parent — fix the keys")

    fit_index = [{k: i for i, k in enumerate(fit.effects(level)["group"].to_list())} for level in levels]
    fit_parent = dict(zip(fit.effects(leaf)["group"].to_list(), fit.effects(leaf)["parent"].to_list()))
    leaf_keys = groups[leaf].to_list()
    keys_at = [groups[level].to_list() for level in levels]
    variances = [_scale_variance(fit.summary, level) for level in levels]
    missing_scales = [level for level, (_, found) in zip(levels, variances) if not found]
    var = [v for v, _ in variances]

    n_target, kept = groups.height, kept_index.size
    effects = np.empty((kept, n_target), dtype=np.float32)
    basis = []
    seen = np.zeros(n_target, dtype=bool)
    new_top = np.zeros(n_target, dtype=bool)
    # Group target columns by where their draws come from, so each source is gathered once.
    by_depth: dict[int, tuple[list[int], list[int]]] = {}
    unseen_top: list[int] = []
    for j, key in enumerate(leaf_keys):
        if key in fit_index[-1]:
            if len(levels) > 1 and fit_parent[key] != keys_at[-2][j]:
                raise DataError(f"target group {key!r} of level {leaf!r} sits under {levels[-2]!r} "
                                f"{keys_at[-2][j]!r}, but under {fit_parent[key]!r} in the fit; fix the target's keys")
            seen[j] = True
            basis.append("group")
            by_depth.setdefault(len(levels) - 1, ([], []))
            by_depth[len(levels) - 1][0].append(j)
            by_depth[len(levels) - 1][1].append(fit_index[-1][key])
            continue
        for depth in range(len(levels) - 2, -1, -1):
            if keys_at[depth][j] in fit_index[depth]:
                basis.append(f"ancestor:{levels[depth]}")
                by_depth.setdefault(depth, ([], []))
                by_depth[depth][0].append(j)
                by_depth[depth][1].append(fit_index[depth][keys_at[depth][j]])
                break
        else:
            basis.append("new_group")
            new_top[j] = True
            unseen_top.append(j)
    for depth, (columns, fit_columns) in by_depth.items():
        draws = fit.draws[f"effect.{levels[depth]}"][kept_index][:, fit_columns]
        spread = math.sqrt(sum(var[depth + 1:]))
        if spread > 0:
            draws = draws + spread * rng.standard_normal(draws.shape)
        effects[:, columns] = draws
    if unseen_top:
        spread = math.sqrt(sum(var[1:]))
        base = fit.draws["new_group"][kept_index][:, None]
        effects[:, unseen_top] = base + spread * rng.standard_normal((kept, len(unseen_top)))
    parent = groups[levels[-2]] if len(levels) > 1 else pl.Series([None] * n_target, dtype=pl.String)
    table_out = pl.DataFrame({"level": [leaf] * n_target, "group": leaf_keys, "parent": parent,
                              "n": groups["_n"], "seen": seen, "basis": basis})
    return table_out, effects, new_top, missing_scales


def _kept_draws(total: int, groups: int) -> np.ndarray:
    """Every k-th draw, so that (kept, groups) float32 fits the memory budget (all when it fits)."""
    fits = max(DRAWS_BUDGET_BYTES // (4 * max(groups, 1)), 1)
    return np.arange(0, total, max(1, -(-total // fits)))


def _summary(draws: np.ndarray, interval: float) -> dict:
    lo, hi = np.quantile(draws, [(1 - interval) / 2, (1 + interval) / 2])
    return {"mean": float(draws.mean()), "sd": float(draws.std(ddof=1)) if draws.size > 1 else 0.0,
            "lower": float(lo), "upper": float(hi)}


def _shift(fit: FitView, table: pl.DataFrame, thresholds: dict) -> tuple[dict, list[str], bool]:
    """Per covariate: SMD of the target against the fit's rows, and the share outside the fit's range."""
    profile = fit.summary.get("covariates") or {}
    shift, messages, unchecked = {}, [], False
    for x in fit.covariates:
        source = profile.get(x)
        if not source:
            messages.append(f"covariate {x!r}: the fit records no profile of it (written by an older version); "
                            "refit with this version to check the shift")
            unchecked = True
            continue
        values = table[x].cast(pl.Float64).to_numpy()
        t_mean, t_sd = float(values.mean()), float(values.std())
        s_mean, s_sd, s_min, s_max = source["mean"], source["sd"], source.get("min"), source.get("max")
        if s_sd and s_sd > 0:
            smd = (t_mean - s_mean) / s_sd
        else:
            smd = 0.0 if t_mean == s_mean else math.inf
        outside = None
        if s_min is not None and s_max is not None:
            outside = float(((values < s_min) | (values > s_max)).mean())
        shift[x] = {"smd": smd, "outside_share": outside, "target_mean": t_mean, "target_sd": t_sd,
                    "source_mean": s_mean, "source_sd": s_sd, "source_min": s_min, "source_max": s_max}
        too_far = abs(smd) > thresholds["max_smd"]
        too_wide = outside is not None and outside > thresholds["max_outside"]
        if too_far or too_wide:
            parts = []
            if too_far:
                parts.append(f"its mean is {abs(smd):.2f} of the fitted data's standard deviations "
                             f"{'higher' if smd > 0 else 'lower'} than in the data the effect was estimated on "
                             f"({t_mean:.4g} vs {s_mean:.4g}; threshold {thresholds['max_smd']})")
            if too_wide:
                parts.append(f"{outside:.0%} of target rows lie outside the range the fit observed "
                             f"[{s_min:.4g}, {s_max:.4g}] (threshold {thresholds['max_outside']:.0%})")
            messages.append(
                f"covariate {x!r} is shifted in the target: " + "; and ".join(parts) + ". The fitted effect "
                f"assumes it does not depend on {x!r}, which the fit cannot check where it saw no data. A different "
                f"measuring instrument, a recalibration or a different population can cause such a shift: find out "
                f"why before acting on the transported effect.")
        if outside is None:
            messages.append(f"covariate {x!r}: the fit came from cell tables, which record no range, so the share "
                            "of target rows outside it is not checked")
    return shift, messages, unchecked


def transport(fit, target, *, count: str | None = None, max_smd: float = DEFAULT_THRESHOLDS["max_smd"],
              max_outside: float = DEFAULT_THRESHOLDS["max_outside"],
              max_unseen: float = DEFAULT_THRESHOLDS["max_unseen"], seed: int = 0) -> Transport:
    """The fitted effect transported to a target population, with the shift report and verdict.

    Parameters
    ----------
    fit : an ``engine.fit`` Result, or a folder written by ``causal-engine fit``
    target : the target population: rows (every grouping column of the fit, and its covariates)
        or, with ``count``, one row per group with the number of target rows in it; any input
        ``engine.fit`` accepts (paths, globs, Polars, pandas, Arrow)
    count : name of the column of group counts (rows per group); None = ``target`` is rows
    max_smd, max_outside, max_unseen : the verdict's thresholds (module docstring)
    seed : seeds the predictive draws of groups the fit never saw

    Example
    -------
    >>> moved = transport(result, target_rows, max_smd=0.25)              # doctest: +SKIP
    >>> moved.report["verdict"]                                           # doctest: +SKIP
    'ok'
    """
    started = time.perf_counter()
    fit = load_fit(fit, "transport")
    thresholds = check_thresholds(max_smd, max_outside, max_unseen)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SpecError(f"seed: expected a non-negative integer, found {seed!r}")
    if count is not None and (not isinstance(count, str) or not count):
        raise SpecError(f"count: expected a column name, found {count!r}")
    levels, covariates = fit.levels, fit.covariates
    source, table, rows_read = _read_target(target, levels, covariates, count)
    interval = float(fit.summary.get("interval", 0.9))
    rng = np.random.default_rng([seed, 7])
    total_draws = fit.draws["ate"].shape[0]
    messages: list[str] = []

    if levels:
        n_target_groups = table.select(pl.struct(levels).n_unique()).item()
        kept = _kept_draws(total_draws, n_target_groups)
        groups, effects, new_top, missing_scales = _composition(fit, table, rng, kept)
        weights = groups["n"].to_numpy()
        weights = weights / weights.sum()
        ate_draws = effects.astype(np.float64) @ weights
        unseen_share = float(weights[~groups["seen"].to_numpy()].sum())
        new_top_share = float(weights[new_top].sum())
        lower, upper = np.quantile(effects, [(1 - interval) / 2, (1 + interval) / 2], axis=0)
        sd = effects.std(axis=0, ddof=1, dtype=np.float64) if effects.shape[0] > 1 else np.zeros(effects.shape[1])
        groups = groups.with_columns(pl.Series("mean", effects.mean(axis=0, dtype=np.float64)),
                                     pl.Series("sd", sd), pl.Series("lower", lower.astype(np.float64)),
                                     pl.Series("upper", upper.astype(np.float64)))
        draws = {"ate": ate_draws.astype(np.float32), f"effect.{levels[-1]}": effects}
        seen_groups = int(groups["seen"].sum())
        if missing_scales:
            messages.append(f"the fit records no effect scale for level(s) {missing_scales}; unseen groups get no "
                            "extra spread there, so their intervals are too narrow")
    else:
        ate_draws = np.asarray(fit.draws["ate"], dtype=np.float64)
        unseen_share = new_top_share = 0.0
        groups = pl.DataFrame(schema=TARGET_GROUP_COLUMNS)
        draws = {"ate": ate_draws.astype(np.float32)}
        seen_groups = 0
    groups = groups.cast(TARGET_GROUP_COLUMNS).select(list(TARGET_GROUP_COLUMNS))

    shift, shift_messages, unchecked = ({}, [], False)
    if count is None:
        shift, shift_messages, unchecked = _shift(fit, table, thresholds)
    elif covariates:
        unchecked = True
        shift_messages.append(f"the target is given as group counts, so the fit's covariates "
                              f"({', '.join(map(repr, covariates))}) could not be compared with it; pass the "
                              "target's rows to check the shift")
    warn = unchecked or any(abs(s["smd"]) > thresholds["max_smd"]
                            or (s["outside_share"] is not None and s["outside_share"] > thresholds["max_outside"])
                            for s in shift.values())
    messages = shift_messages + messages
    if unseen_share > thresholds["max_unseen"]:
        warn = True
        messages.append(f"{unseen_share:.0%} of target rows are in groups the fit never saw (threshold "
                        f"{thresholds['max_unseen']:.0%}); their effect is the predictive distribution of a new "
                        "group, which is wide and rests on the fitted groups resembling the new ones — collect data "
                        "in those groups if the decision depends on them")
    if covariates:
        it = "it" if len(covariates) == 1 else "them"
        messages.append(f"the model adjusts for {', '.join(map(repr, covariates))} with shared slopes, so the effect "
                        f"does not depend on {it}: the transported effect re-weights group effects only, and "
                        f"{'the covariate serves' if it == 'it' else 'the covariates serve'} the shift check")
    source_ate = fit.summary.get("ate", {})
    ate = _summary(ate_draws, interval)
    report = {
        "ate": ate,
        "unseen_share": unseen_share,
        "shift": shift,
        "verdict": "warn" if warn else "ok",
        "messages": messages,
        "interval": interval,
        "source_ate": {k: source_ate.get(k) for k in ("mean", "sd", "lower", "upper")},
        "composition": {"target_rows": float(table["_n"].sum()), "target_groups": groups.height,
                        "seen_groups": seen_groups, "unseen_groups": groups.height - seen_groups,
                        "new_top_level_share": new_top_share},
        "thresholds": thresholds,
        "draws": int(ate_draws.shape[0]),
    }
    prov = {
        "format": provenance.FORMAT, "kind": "transport", "created": provenance.now(),
        "source": fit.source_block(),
        "target": {"kind": source.kind,
                   "files": [{"path": f.path, "size": f.size, "mtime": f.mtime} for f in source.files],
                   "mode": "counts" if count is not None else "rows", "count_column": count,
                   "rows_read": rows_read, "target_rows": report["composition"]["target_rows"],
                   "groups": groups.height, "columns": [*levels, *([count] if count else covariates)]},
        "options": {**thresholds, "seed": seed, "interval": interval},
        "method": ("post-stratification of the fit's retained joint draws of the leaf-group effects over the "
                   "target's composition; unseen groups from their nearest seen ancestor (or the new-group draw) "
                   "plus the effect scales of the levels below"),
        "shift": shift, "verdict": report["verdict"], "messages": messages,
        "draws": report["draws"],
        "versions": provenance.versions(),
        "timings": {"total_s": round(time.perf_counter() - started, 3)},
    }
    return Transport(report=report, groups=groups, draws=draws, provenance=prov)
