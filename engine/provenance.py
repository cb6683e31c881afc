"""The provenance record: where every number came from, and `explain`."""
from __future__ import annotations

import datetime as dt
import platform
import sys
from importlib import metadata

FORMAT = "causal-engine/provenance/1"


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
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
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
            "drop_missing": spec.drop_missing, "backend": spec.backend,
        },
        "seeds": {"seed": spec.seed},
        "sampler": sampler,
        "versions": versions(),
        "timings": timings,
        "diagnostics": diagnostics,
    }


def explain(record: dict, summary: dict | None = None) -> str:
    """A readable trail of a provenance record."""
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
    lines.append(f"  method {spec.get('method')} (asked: {spec.get('method_requested')}; {spec.get('method_reason')})")
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
    if summary:
        ate = summary.get("ate", {})
        lines.append("")
        lines.append("Result")
        lines.append(f"  ATE {ate.get('mean'):.4g} (sd {ate.get('sd'):.3g}), "
                     f"{summary.get('interval', 0.9):.0%} interval [{ate.get('lower'):.4g}, {ate.get('upper'):.4g}]")
    v = record.get("versions", {})
    lines.append("")
    lines.append(f"Versions: causal-engine {v.get('causal-engine')}, jax {v.get('jax')}, numpyro {v.get('numpyro')}, "
                 f"polars {v.get('polars')}, python {v.get('python')}")
    t = record.get("timings", {})
    lines.append(f"Timings: reduce {t.get('reduce_s')} s, fit {t.get('fit_s')} s, total {t.get('total_s')} s")
    return "\n".join(lines)
