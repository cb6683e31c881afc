"""Trust checks on every fit: sample ratio mismatch, covariate balance, and the placebo refit.

They read the cell table only (never the rows, never the posterior), so they
cost nothing next to inference, and they go into ``summary.json`` under
``"checks"`` and into the provenance trail.

- **Sample ratio mismatch** (SRM): is the observed treated share consistent with
  the share the design assigned (``design_share``, default 0.5)? Pearson's
  χ² goodness-of-fit test with one degree of freedom, over all rows and per
  leaf group (Bonferroni over groups). A mismatch means rows were lost or
  assigned unequally, and the arms may no longer be comparable
  (Fabijan et al. 2019, "Diagnosing sample ratio mismatch in online controlled experiments").
- **Covariate balance**: the standardized mean difference (SMD) of each
  covariate between arms, (x̄₁ − x̄₀) / √((s₁² + s₀²)/2) (Austin 2009), from the
  cells' covariate moments, with z = SMD / √(1/n₁ + 1/n₀), its size in units of
  its sampling sd under randomisation.
- **Placebo**: a pointer to ``causal-engine refute DIR`` (``engine.refute``),
  which refits with the treatment permuted within groups.

Example
-------
>>> sample_ratio(5100, 4900, 0.5)["flag"]
False
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl

SRM_ALPHA = 0.001      # the customary SRM threshold: a false alarm once in a thousand fits
BALANCE_MAX_SMD = 0.1  # the customary balance threshold (Austin 2009)
BALANCE_MAX_Z = 3.0    # beyond this the imbalance is unlikely to be chance under randomisation
WORST_GROUPS = 5


def chi2_p_value(n_treated: np.ndarray, n: np.ndarray, share: float):
    """Pearson χ² (1 df) of treated counts against ``share``: (statistic, p-value)."""
    n_treated = np.asarray(n_treated, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    expected = n * share
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.where(n > 0, (n_treated - expected) ** 2 / (n * share * (1.0 - share)), 0.0)
    # P(χ²₁ > c) = erfc(√(c/2)), vectorised: one per group (a Python call each took 5 s at 10⁷ groups).
    from scipy.special import erfc

    return chi2, erfc(np.sqrt(chi2 / 2.0))


def sample_ratio(n_control: int, n_treated: int, design_share: float, groups: pl.DataFrame | None = None,
                 level: str | None = None) -> dict:
    """The SRM check: the whole table, and (with ``groups``: key, n, n_treated) each leaf group."""
    n = n_control + n_treated
    chi2, p = chi2_p_value(np.array([n_treated]), np.array([n]), design_share)
    out = {
        "design_share": design_share, "observed_share": n_treated / n if n else None,
        "n": n, "n_treated": n_treated, "chi2": float(chi2[0]), "p_value": float(p[0]),
        "alpha": SRM_ALPHA, "flag": bool(p[0] < SRM_ALPHA),
        "groups_tested": 0, "groups_flagged": 0, "worst_groups": [],
    }
    if groups is not None and groups.height:
        g_chi2, g_p = chi2_p_value(groups["n_treated"].to_numpy(), groups["n"].to_numpy(), design_share)
        threshold = SRM_ALPHA / groups.height
        order = np.argsort(g_p, kind="stable")[:WORST_GROUPS]
        worst = groups[order]
        keys, ns, nts = worst[level].cast(pl.String).to_list(), worst["n"].to_list(), worst["n_treated"].to_list()
        out["groups_tested"] = groups.height
        out["groups_flagged"] = int((g_p < threshold).sum())
        out["group_alpha"] = threshold
        out["worst_groups"] = [{"level": level, "group": keys[j], "n": ns[j], "observed_share": nts[j] / ns[j],
                                "p_value": float(g_p[i])} for j, i in enumerate(order) if g_p[i] < threshold]
    return out


def _arm_moments(table: pl.DataFrame, x: str) -> tuple[float, float, float]:
    """(rows, mean, variance ddof 0) of covariate x over the cells given (Chan et al. 1979 merge)."""
    n = table["n"].cast(pl.Float64).to_numpy()
    total = n.sum()
    if total == 0:
        return 0.0, float("nan"), float("nan")
    means = table[f"x_mean__{x}"].to_numpy()
    mean = float(np.dot(n, means) / total)
    m2 = float(table[f"xx_m2__{x}__{x}"].sum() + np.dot(n, (means - mean) ** 2))
    return float(total), mean, max(m2 / total, 0.0)


def balance(cells) -> dict:
    """Standardized mean difference of every covariate between the arms."""
    treated = cells.table.filter(pl.col("arm") == 1)
    control = cells.table.filter(pl.col("arm") == 0)
    out = {}
    for x in cells.covariates:
        n1, m1, v1 = _arm_moments(treated, x)
        n0, m0, v0 = _arm_moments(control, x)
        pooled_sd = math.sqrt((v1 + v0) / 2.0)
        if n1 == 0 or n0 == 0:
            smd = z = float("nan")
        elif pooled_sd > 0:
            smd = (m1 - m0) / pooled_sd
            z = smd / math.sqrt(1.0 / n1 + 1.0 / n0)
        else:
            smd = z = 0.0 if m1 == m0 else float("inf")
        out[x] = {"mean_treated": m1, "mean_control": m0, "smd": smd, "z": z,
                  "flag": bool(abs(smd) > BALANCE_MAX_SMD) if math.isfinite(smd) else False}
    return {"threshold": BALANCE_MAX_SMD, "covariates": out,
            "flag": any(v["flag"] for v in out.values())}


def placebo_pointer() -> dict:
    return {"status": "not run",
            "how": "causal-engine refute DIR (Python: engine.refute(result, data)) refits with the treatment "
                   "permuted within groups and writes DIR/refute.json"}


def trust_checks(cells, spec, leaf_groups: pl.DataFrame | None = None) -> dict:
    """Every check that the cell table allows, with plain-language messages.

    ``leaf_groups`` is the leaf level's key, ``n`` and ``n_treated``: the encoding's last node
    table, which the fit has already; without it the cells are encoded here."""
    if spec.summary_level:
        return {"ok": True, "sample_ratio": None, "balance": None, "placebo": None,
                "messages": ["summary-level input (one estimate per group) has no arms: sample ratio, balance "
                             "and placebo checks do not apply"]}
    control, treated = cells.arm_rows()
    groups = None
    level = cells.levels[-1] if cells.levels else None
    if level is not None:
        if leaf_groups is None:
            from engine.encode import encode

            leaf_groups = encode(cells).nodes[-1]
        groups = leaf_groups.select(level, "n", "n_treated")
    srm = sample_ratio(control, treated, float(spec.design_share), groups, level)
    bal = balance(cells)
    messages = []
    if srm["flag"]:
        messages.append(
            f"sample ratio mismatch: {srm['observed_share']:.2%} of {srm['n']} rows are treated, but the design "
            f"share is {spec.design_share:.2%} (χ² p = {srm['p_value']:.2g} < {SRM_ALPHA}); rows may have been "
            "lost or assigned unequally, so the arms may not be comparable — find out why before trusting the "
            "effect (or pass the real design share with --design-share)")
    if srm["groups_flagged"]:
        shown = ", ".join(f"{g['group']!r} ({g['observed_share']:.0%} of {g['n']})" for g in srm["worst_groups"][:3])
        messages.append(f"sample ratio mismatch in {srm['groups_flagged']} {level!r} group(s) "
                        f"(Bonferroni p < {srm['group_alpha']:.2g}): {shown}")
    for x, b in bal["covariates"].items():
        if b["flag"]:
            chance = ("larger than chance allows under randomisation" if abs(b["z"]) > BALANCE_MAX_Z
                      else "within what chance allows in this many rows")
            messages.append(
                f"covariate {x!r} is imbalanced between arms: standardized mean difference {b['smd']:+.3f} "
                f"(threshold {BALANCE_MAX_SMD}; z = {b['z']:+.1f}, {chance}); the model adjusts for it, "
                "but check how the arms were assigned")
    serious = srm["flag"] or any(b["flag"] and abs(b["z"]) > BALANCE_MAX_Z for b in bal["covariates"].values())
    return {"ok": not serious, "sample_ratio": srm, "balance": bal, "placebo": placebo_pointer(),
            "messages": messages}


def covariate_profile(cells, checked) -> dict:
    """Mean, sd (over all rows, exact from the cells) and min/max (from validation) of each covariate.

    Transport needs them to say whether a target lies inside the fitted data's range.
    A fit from cell tables has no rows: min and max are null there.
    """
    if not cells.covariates:
        return {}
    moments = cells.pooled_moments()
    ranges = {}
    known = getattr(checked, "covariate_ranges", None)
    rows = getattr(checked, "rows", None)
    if known is not None:
        # Taken in validation's single pass; no second read of the rows.
        ranges = {f"{k}:{x}": v for x, pair in known.items() for k, v in zip(("min", "max"), pair)}
    elif rows is not None:
        # Rows were dropped after validation saw them: one pass over the kept rows.
        exprs = [e for x in cells.covariates
                 for e in (pl.col(x).cast(pl.Float64).min().alias(f"min:{x}"),
                           pl.col(x).cast(pl.Float64).max().alias(f"max:{x}"))]
        ranges = rows.select(exprs).collect().row(0, named=True)
    return {x: {"mean": moments[x][0], "sd": moments[x][1], "min": ranges.get(f"min:{x}"),
                "max": ranges.get(f"max:{x}")} for x in cells.covariates}
