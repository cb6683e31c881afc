"""The provenance record: where every number came from, and `explain`.

Every result folder holds a ``provenance.json`` with ``format`` (the record's
version: this version reads ``FORMAT`` only) and ``kind``: ``fit`` (written by
``causal-engine fit``; records before ``kind`` existed are fits), ``transport``
or ``decision``. `read_record` checks both before anything reads a folder.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path

from engine.errors import DataError

FORMAT = "causal-engine/provenance/1"
READABLE_FORMATS = (FORMAT,)
KINDS = {"fit": "summary.json", "transport": "transport.json", "decision": "decisions.json"}
WRITTEN_BY = {"fit": "causal-engine fit", "transport": "causal-engine transport", "decision": "causal-engine decide"}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_record(folder, expect=("fit",), needs=(), command="this command") -> dict:
    """Read ``folder/provenance.json`` and check that it is a result of a kind in ``expect``,
    in a format this version reads, with the files ``needs`` beside it.

    Raises ``DataError`` naming the folder, what was expected and the fix.
    """
    folder = Path(folder)
    wanted = " or ".join(f"`{WRITTEN_BY[k]}`" for k in expect)
    if not folder.is_dir():
        raise DataError(f"{command}: {str(folder)!r} is not a folder; pass a folder written by {wanted}")
    path = folder / "provenance.json"
    if not path.is_file():
        raise DataError(f"{command}: {str(folder)!r} holds no provenance.json, so it is not a causal-engine "
                        f"result; pass a folder written by {wanted}")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{command}: {str(path)!r} cannot be read as JSON ({exc}); pass a folder written by "
                        f"{wanted}, or rewrite this one") from None
    if not isinstance(record, dict):
        raise DataError(f"{command}: {str(path)!r} is not a provenance record; pass a folder written by {wanted}")
    found = record.get("format")
    if found not in READABLE_FORMATS:
        raise DataError(f"{command}: {str(folder)!r} was written by an incompatible version of causal-engine "
                        f"(provenance format {found!r}; this version reads {', '.join(READABLE_FORMATS)}); "
                        "rerun the command that wrote it with this version")
    kind = record.get("kind", "fit")
    if kind not in expect:
        raise DataError(f"{command}: {str(folder)!r} holds a {kind} result (written by "
                        f"`{WRITTEN_BY.get(kind, kind)}`); expected a folder written by {wanted}")
    missing = [name for name in (KINDS[kind], *needs) if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{command}: {str(folder)!r} lacks {', '.join(missing)}; it was written by an older or "
                        f"interrupted run — rerun `{WRITTEN_BY[kind]}` with this version")
    return record


def versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in ("causal-engine", "jax", "jaxlib", "numpyro", "optax", "polars", "pyarrow", "numpy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def build(*, checked, spec, priors, cells_hash, n_cells, method, method_reason, sampler, timings,
          diagnostics, source_kind, files) -> dict:
    return {
        "format": FORMAT,
        "kind": "fit",
        "created": now(),
        "inputs": {
            "kind": source_kind,
            "files": [{"path": f.path, "size": f.size, "mtime": f.mtime} for f in files],
            "rows_read": checked.n_rows_read,
            "rows_used": checked.n_rows_used,
            "rows_dropped": checked.dropped,
            "cells": n_cells,
            "cells_sha256": cells_hash,
        },
        "schema": checked.schema,
        "spec": {
            "outcome": spec.outcome, "treatment": spec.treatment,
            "treatment_values": checked.treatment_values,
            "groups": list(spec.groups), "covariates": list(spec.covariates),
            "family": spec.family, "method_requested": spec.method, "method": method,
            "method_reason": method_reason, "interval": spec.interval,
            "priors": {name: str(p) for name, p in sorted(priors.items())},
            "priors_set_by_user": sorted(spec.priors),
            "priors_user": {name: str(p) for name, p in sorted(spec.priors.items())},
            "drop_missing": spec.drop_missing, "backend": spec.backend,
            "treated_value": None if spec.treated_value is None else str(spec.treated_value),
            "noise_by_arm": spec.noise_by_arm, "correlated": spec.correlated,
            "estimate": spec.estimate, "stderr": spec.stderr,
            "design_share": spec.design_share, "trials": spec.trials, "exposure": spec.exposure,
            "keep_draws": spec.keep_draws,
            **({"covariate_route": covariate_route(spec, checked)} if spec.binned else {}),
        },
        "seeds": {"seed": spec.seed},
        "sampler": sampler,
        "versions": versions(),
        "timings": timings,
        "diagnostics": diagnostics,
    }


def covariate_route(spec, checked) -> dict:
    """How a GLM with covariates was compressed: the binned route, with its bin edges."""
    edges = checked.bin_edges or {}
    return {"route": "binned", "bins_requested": spec.covariate_bins,
            "bins": {c: len(e) + 1 for c, e in edges.items()}, "edges": edges,
            "approximation": "each cell's rows share the cell's mean covariate values (the likelihood "
                             "is exact in the bin means, not in each row's values)"}


def explain(record: dict, summary: dict | None = None, refute: dict | None = None) -> str:
    """A readable trail of a provenance record.

    ``summary`` is the folder's result file: summary.json for a fit, transport.json for
    a transport, decisions.json for a decision; ``refute`` a fit's refute.json, if any.
    """
    kind = record.get("kind", "fit")
    if kind == "transport":
        return _explain_transport(record, summary)
    if kind == "decision":
        return _explain_decision(record, summary)
    lines = []
    inputs, spec = record.get("inputs", {}), record.get("spec", {})
    lines.append(f"causal-engine result ({record.get('format')}, created {record.get('created')})")
    lines.append("")
    lines.append("Inputs")
    for f in inputs.get("files", []):
        lines.append(f"  file {f['path']}  ({f['size']} bytes, modified "
                     f"{dt.datetime.fromtimestamp(f['mtime'], dt.timezone.utc).isoformat(timespec='seconds')})")
    if not inputs.get("files"):
        lines.append(f"  in-memory data ({inputs.get('kind')})")
    lines.append(f"  rows read {inputs.get('rows_read')}, used {inputs.get('rows_used')}")
    for reason, count in (inputs.get("rows_dropped") or {}).items():
        lines.append(f"  dropped {count} row(s): {reason}")
    lines.append(f"  reduced to {inputs.get('cells')} cells, sha256 {inputs.get('cells_sha256')}")
    lines.append("")
    lines.append("Model")
    tv = spec.get("treatment_values", {})
    lines.append(f"  outcome {spec.get('outcome')!r} ({spec.get('family')}), treatment {spec.get('treatment')!r} "
                 f"(treated = {tv.get('treated')}, control = {tv.get('control')})")
    lines.append(f"  groups {' ▸ '.join(spec.get('groups', [])) or '(none: one population)'}")
    if spec.get("covariates"):
        lines.append(f"  covariates {', '.join(spec['covariates'])}")
    route = spec.get("covariate_route")
    if route:
        bins = ", ".join(f"{c} {k}" for c, k in route["bins"].items())
        lines.append(f"  covariates binned (quantile bins: {bins}): {route['approximation']}")
    if spec.get("trials") or spec.get("exposure"):
        lines.append(f"  {'trials' if spec.get('trials') else 'exposure'} column "
                     f"{spec.get('trials') or spec.get('exposure')!r}")
    lines.append(f"  method {spec.get('method')} (asked: {spec.get('method_requested')}; {spec.get('method_reason')})")
    sampler = record.get("sampler", {})
    if "quadrature_nodes" in sampler:
        lines.append(f"  leaf integrals: {sampler.get('quadrature_leaves', 0)} small leaves by adaptive "
                     f"Gauss–Hermite quadrature ({sampler['quadrature_nodes']} nodes), the rest by Laplace; "
                     f"Newton converged in ≤ {sampler.get('newton_steps_max')} steps")
    if "prob_positive_exact_groups" in sampler:
        lines.append(f"  prob_positive: a Taylor expansion with a per-group error bound of "
                     f"{sampler.get('prob_positive_tolerance')}, except "
                     f"{sampler['prob_positive_exact_groups']} group(s) that took the exact mean over draws")
    user = set(spec.get("priors_set_by_user", []))
    for name, prior in (spec.get("priors") or {}).items():
        by = "user" if name in user or name.split(".")[0] in user else "default, scaled to the data"
        lines.append(f"  prior {name} ~ {prior}  [{by}]")
    sampler = record.get("sampler", {})
    lines.append(f"  seed {record.get('seeds', {}).get('seed')}, {sampler.get('chains')} chain(s) × "
                 f"{sampler.get('draws')} draws after {sampler.get('warmup')} warm-up, on "
                 f"{', '.join(sampler.get('devices', []))}")
    lines.append("")
    d = record.get("diagnostics", {})
    lines.append("Diagnostics")
    lines.append(f"  ok {d.get('ok')}, max R-hat {d.get('max_rhat')}, min bulk ESS {d.get('min_ess_bulk')}, "
                 f"divergences {d.get('divergences')}")
    for message in d.get("messages", []):
        lines.append(f"  ! {message}")
    checks = record.get("checks") or (summary or {}).get("checks")
    if checks is not None or refute is not None:
        lines.append("")
        lines.extend(_checks_lines(checks or {}, refute))
    if summary:
        ate = summary.get("ate", {})
        lines.append("")
        lines.append("Result")
        lines.append(f"  ATE {ate.get('mean'):.4g} (sd {ate.get('sd'):.3g}), "
                     f"{summary.get('interval', 0.9):.0%} interval [{ate.get('lower'):.4g}, {ate.get('upper'):.4g}]"
                     + (" (risk or rate difference)" if summary.get("ate_link") else ""))
        link = summary.get("ate_link")
        if link:
            lines.append(f"  on the link scale (log odds or log rate ratio) {link['mean']:.4g} "
                         f"[{link['lower']:.4g}, {link['upper']:.4g}]")
    v = record.get("versions", {})
    lines.append("")
    lines.append(f"Versions: causal-engine {v.get('causal-engine')}, jax {v.get('jax')}, numpyro {v.get('numpyro')}, "
                 f"polars {v.get('polars')}, python {v.get('python')}")
    t = record.get("timings", {})
    lines.append(f"Timings: reduce {t.get('reduce_s')} s, fit {t.get('fit_s')} s, total {t.get('total_s')} s")
    return "\n".join(lines)


def _fmt(value, spec=".4g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _checks_lines(checks: dict, refute: dict | None) -> list[str]:
    lines = ["Trust checks"]
    srm = checks.get("sample_ratio")
    if srm:
        lines.append(f"  sample ratio: {_fmt(srm.get('observed_share'), '.2%')} of {srm.get('n')} rows treated, "
                     f"design share {_fmt(srm.get('design_share'), '.2%')}, χ² p = {_fmt(srm.get('p_value'), '.3g')} "
                     f"→ {'MISMATCH' if srm.get('flag') else 'ok'}"
                     + (f"; {srm['groups_flagged']} of {srm['groups_tested']} groups mismatched"
                        if srm.get("groups_flagged") else ""))
    balance = checks.get("balance") or {}
    for x, b in (balance.get("covariates") or {}).items():
        lines.append(f"  balance of {x!r}: standardized mean difference {_fmt(b.get('smd'), '+.3f')} "
                     f"(z {_fmt(b.get('z'), '+.1f')}) → {'IMBALANCED' if b.get('flag') else 'ok'}")
    if refute is not None:
        p = refute.get("placebo", {})
        lines.append(f"  placebo refit (treatment permuted within {refute.get('permuted_within') or 'the population'}, "
                     f"seed {refute.get('seed')}): effect {_fmt(p.get('mean'))}, interval "
                     f"[{_fmt(p.get('lower'))}, {_fmt(p.get('upper'))}] → "
                     f"{'passed (contains 0)' if refute.get('passed') else 'FAILED (excludes 0)'}")
    elif checks.get("placebo"):
        lines.append(f"  placebo: {checks['placebo'].get('status')} — {checks['placebo'].get('how')}")
    for message in checks.get("messages", []):
        lines.append(f"  ! {message}")
    return lines


def _interval_line(label: str, block: dict | None, interval) -> str:
    block = block or {}
    return (f"  {label} {_fmt(block.get('mean'))} (sd {_fmt(block.get('sd'), '.3g')}), "
            f"{_fmt(interval, '.0%')} interval [{_fmt(block.get('lower'))}, {_fmt(block.get('upper'))}]")


def _source_lines(source: dict) -> list[str]:
    where = source.get("path") or "(in memory)"
    lines = [f"  {source.get('kind', 'fit')} {where}"]
    if source.get("fit_path") is not None or source.get("kind") == "transport":
        lines.append(f"    transported from fit {source.get('fit_path') or '(in memory)'}")
    lines.append(f"    cells sha256 {source.get('cells_sha256')}, created {source.get('created')}")
    spec = source.get("spec") or {}
    if spec:
        lines.append(f"    outcome {spec.get('outcome')!r}, treatment {spec.get('treatment')!r}, groups "
                     f"{' ▸ '.join(spec.get('groups', [])) or '(none)'}, covariates "
                     f"{', '.join(spec.get('covariates', [])) or '(none)'}, method {spec.get('method')}")
    return lines


def _footer(record: dict) -> list[str]:
    v, t = record.get("versions", {}), record.get("timings", {})
    return ["", f"Versions: causal-engine {v.get('causal-engine')}, numpy {v.get('numpy')}, polars {v.get('polars')}, "
                f"python {v.get('python')}",
            f"Timings: total {t.get('total_s')} s"]


def _explain_transport(record: dict, report: dict | None) -> str:
    lines = [f"causal-engine transport ({record.get('format')}, created {record.get('created')})", "", "Source"]
    lines.extend(_source_lines(record.get("source", {})))
    target = record.get("target", {})
    lines += ["", "Target population"]
    for f in target.get("files", []):
        lines.append(f"  file {f['path']}  ({f['size']} bytes, modified "
                     f"{dt.datetime.fromtimestamp(f['mtime'], dt.timezone.utc).isoformat(timespec='seconds')})")
    if not target.get("files"):
        lines.append(f"  in-memory data ({target.get('kind')})")
    if target.get("mode") == "counts":
        lines.append(f"  given as group counts in column {target.get('count_column')!r}: "
                     f"{_fmt(target.get('target_rows'), ',.0f')} rows in {target.get('groups')} groups")
    else:
        lines.append(f"  given as rows: {target.get('rows_read')} rows in {target.get('groups')} groups")
    options = record.get("options", {})
    lines.append(f"  thresholds: |SMD| ≤ {options.get('max_smd')}, outside range ≤ {options.get('max_outside')}, "
                 f"unseen groups ≤ {options.get('max_unseen')}")
    lines += ["", "Method", f"  {record.get('method')}"]
    if report:
        lines += ["", "Result", _interval_line("target ATE", report.get("ate"), options.get("interval"))]
        lines.append(f"  source ATE {_fmt((report.get('source_ate') or {}).get('mean'))}; "
                     f"{_fmt(report.get('unseen_share'), '.1%')} of target rows in groups the fit never saw")
        for x, shift in (report.get("shift") or {}).items():
            lines.append(f"  shift of {x!r}: standardized mean difference {_fmt(shift.get('smd'), '+.3f')}, "
                         f"{_fmt(shift.get('outside_share'), '.1%')} of target rows outside the fitted range")
        lines.append(f"  verdict {str(report.get('verdict')).upper()}")
        for message in report.get("messages", []):
            lines.append(f"  ! {message}")
    return "\n".join(lines + _footer(record))


def _explain_decision(record: dict, summary: dict | None) -> str:
    options = record.get("options", {})
    lines = [f"causal-engine decision ({record.get('format')}, created {record.get('created')})", "", "Source"]
    lines.extend(_source_lines(record.get("source", {})))
    lines += ["", "Utility",
              f"  per row: treat = {options.get('benefit')} × effect − {options.get('cost')}; control = 0; "
              f"decided per {options.get('level')!r} group from {record.get('draws')} joint posterior draws"]
    if summary:
        pop, totals = summary.get("population", {}), summary.get("totals", {})
        lines += ["", "Result",
                  f"  whole population: {pop.get('action')} (expected utility per row "
                  f"{_fmt(pop.get('expected_utility'))}, P(best) {_fmt(pop.get('prob_best'), '.2f')}, "
                  f"EVPI per row {_fmt(pop.get('evpi'), '.3g')})",
                  f"  per group: treat {totals.get('treat_groups')} group(s) ({_fmt(totals.get('treat_rows'), ',.0f')} "
                  f"rows), control {totals.get('control_groups')}; total expected utility "
                  f"{_fmt(totals.get('expected_utility'), ',.4g')}, total EVPI {_fmt(totals.get('evpi'), ',.4g')}"]
        for g in summary.get("value_of_information", [])[:5]:
            lines.append(f"  more data worth most: {g.get('group')!r} (EVPI {_fmt(g.get('evpi_total'), ',.3g')} in "
                         f"total, {_fmt(g.get('evpi'), '.3g')} per row over {_fmt(g.get('n'), ',.0f')} rows)")
    return "\n".join(lines + _footer(record))
